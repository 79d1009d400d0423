"""The attention groups one member holds, each with its K/V cache.

An attention group is one KV head with its query heads (rows of q, k, v and columns of o). Its
state is its K/V cache, so it moves only with it (`export` on the old rank, `regroup` with the
imported cache on the new one). Every step appends its K/V: a member's cache never has holes,
and an input whose position is behind the cache starts the sequence over from there (a new
prompt).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import HaloError
from ..model.config import ModelArgs
from ..model.llama import Attention, Rope

LoadAttention = Callable[[int, np.ndarray], Attention]   # (layer, KV heads) -> their Attention


@dataclass
class _Layer:
    attention: Attention
    k: torch.Tensor          # (n_kv held, capacity, hd)
    v: torch.Tensor          # (n_kv held, capacity, hd)
    pos: int = 0             # positions stored


class HeldAttention:
    """Per layer: the attention of the held KV heads and their caches (grown by doubling)."""

    def __init__(self, args: ModelArgs, load: LoadAttention):
        self.args, self.load = args, load
        self.rope = Rope(args)
        self.layers: dict[int, _Layer] = {}

    def heads(self, layer: int) -> np.ndarray:
        held = self.layers.get(layer)
        return held.attention.ids if held else np.zeros(0, np.int64)

    def step(self, layer: int, x: torch.Tensor, pos: int, reply: bool = True) -> torch.Tensor | None:
        """Append the K/V of x (T, dim) at pos..; with `reply`, the held heads' output (T, dim)."""
        held = self.layers.get(layer)
        if held is None:
            raise HaloError(f"no attention groups of layer {layer} are held here")
        if pos > held.pos:
            raise HaloError(f"attention input of layer {layer} at position {pos}, but the cache "
                            f"holds {held.pos}: it would have a hole")
        T = x.shape[0]
        self._reserve(held, pos + T)
        cos, sin = self.rope(pos, T)
        q = held.attention.append(x, held.k, held.v, pos, cos, sin)
        held.pos = pos + T
        return held.attention.attend(q, held.k, held.v, pos) if reply else None

    def _reserve(self, held: _Layer, length: int):
        cap = held.k.shape[1]
        if length <= cap:
            return
        new = min(max(length, 2 * cap, 64), max(self.args.max_seq_len, length))
        for name in ("k", "v"):
            old = getattr(held, name)
            grown = torch.zeros(old.shape[0], new, old.shape[2])
            grown[:, :held.pos] = old[:, :held.pos]
            setattr(held, name, grown)

    def export(self, layer: int, head: int) -> np.ndarray:
        """The cache of one held head: (2 * pos, hd), keys then values."""
        held = self.layers[layer]
        i = int(np.searchsorted(held.attention.ids, head))
        if i >= len(held.attention.ids) or held.attention.ids[i] != head:
            raise HaloError(f"KV head {head} of layer {layer} is not held here")
        return torch.cat([held.k[i, :held.pos], held.v[i, :held.pos]]).numpy()

    def regroup(self, layer: int, ids: np.ndarray, imported: dict[int, np.ndarray] | None = None):
        """Hold KV heads `ids` of `layer` from now on: heads kept keep their cache, new ones take
        theirs from `imported` (head -> (2 * pos, hd)), or start empty at position 0."""
        ids = np.sort(np.asarray(ids, dtype=np.int64))
        old, imported = self.layers.get(layer), imported or {}
        if old is not None and np.array_equal(old.attention.ids, ids):
            return
        if not len(ids):
            self.layers.pop(layer, None)
            return
        pos = old.pos if old is not None else (len(next(iter(imported.values()))) // 2 if imported else 0)
        hd = self.args.head_dim
        k, v = torch.zeros(len(ids), max(pos, 1), hd), torch.zeros(len(ids), max(pos, 1), hd)
        kept = {} if old is None else {int(h): i for i, h in enumerate(old.attention.ids)}
        for i, head in enumerate(ids.tolist()):
            if head in kept:
                k[i, :pos], v[i, :pos] = old.k[kept[head], :pos], old.v[kept[head], :pos]
            elif head in imported:
                kv = torch.from_numpy(imported[head]).view(2, -1, hd)        # (2, pos, hd)
                if kv.shape[1] != pos:
                    raise HaloError(f"K/V of head {head} of layer {layer} holds {kv.shape[1]} "
                                    f"positions, the layer {pos}")
                k[i, :pos], v[i, :pos] = kv[0], kv[1]
            elif pos:
                raise HaloError(f"KV head {head} of layer {layer} arrived without its cache")
        self.layers[layer] = _Layer(self.load(layer, ids), k, v, pos)

    def reassign(self, heads: dict[int, np.ndarray]):
        """Hold `heads` (layer -> KV heads) from now on, every cache empty, to be refilled from
        position 0 (a replay of the sequence so far: lead.py). A layer whose heads stay keeps its
        weights; the others are read from the store now."""
        layers = {}
        for layer, ids in heads.items():
            ids = np.sort(np.asarray(ids, dtype=np.int64))
            if not len(ids):
                continue
            old = self.layers.get(layer)
            same = old is not None and np.array_equal(old.attention.ids, ids)
            empty = torch.zeros(len(ids), 1, self.args.head_dim)                # (n_kv, 1, hd)
            layers[layer] = _Layer(old.attention if same else self.load(layer, ids), empty, empty.clone())
        self.layers = layers

    @property
    def count(self) -> int:
        """Attention groups held, over every layer."""
        return int(sum(len(h.attention.ids) for h in self.layers.values()))

    @property
    def nbytes(self) -> int:
        """Weight bytes held (the caches are not weights)."""
        return sum(h.attention.nbytes for h in self.layers.values())

    @property
    def cache_bytes(self) -> int:
        return sum(2 * h.k.numel() * h.k.element_size() for h in self.layers.values())
