"""The attention groups one member holds, each with its K/V caches (one per sequence).

An attention group is one KV head with its query heads (rows of q, k, v and columns of o). Its
state is its K/V cache, so it stays where it is: a change of members (lead.py) empties every cache
and rank 0 replays the sequences so far to refill them. Every step appends its K/V: a member's
cache never has holes, and an input whose position is behind the cache starts the sequence over
from there (a new prompt). Several sequences decode together in batched steps (model/batch.py):
each has a slot (rank 0 numbers them, 0 for a lone session), and each slot its own caches.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import HaloError
from ..model.config import ModelArgs
from ..model.llama import Attention, Ragged, Rope

LoadAttention = Callable[[int, np.ndarray], Attention]   # (layer, KV heads) -> their Attention


@dataclass
class _Cache:
    """One sequence's keys and values for the held heads of one layer."""
    k: torch.Tensor          # (n_kv held, capacity, hd)
    v: torch.Tensor          # (n_kv held, capacity, hd)
    pos: int = 0             # positions stored


@dataclass
class _Layer:
    attention: Attention
    caches: dict[int, _Cache] = field(default_factory=dict)    # slot -> its sequence's cache


class HeldAttention:
    """Per layer: the attention of the held KV heads and each sequence's caches (grown by
    doubling, made at a slot's first input)."""

    def __init__(self, args: ModelArgs, load: LoadAttention):
        self.args, self.load = args, load
        self.rope = Rope(args)
        self.layers: dict[int, _Layer] = {}

    def heads(self, layer: int) -> np.ndarray:
        held = self.layers.get(layer)
        return held.attention.ids if held else np.zeros(0, np.int64)

    def step(self, layer: int, x: torch.Tensor, pos: int, reply: bool = True,
             slot: int = 0) -> torch.Tensor | None:
        """Append the K/V of x (T, dim) at pos.. to slot's cache; with `reply`, the held heads'
        output (T, dim)."""
        held = self._held(layer)
        T = x.shape[0]
        cache = self._cache(held, layer, slot, pos, T)
        cos, sin = self.rope(pos, T)
        q = held.attention.append(x, cache.k, cache.v, pos, cos, sin)
        cache.pos = pos + T
        return held.attention.attend(q, cache.k, cache.v, pos) if reply else None

    def ragged(self, layer: int, x: torch.Tensor, batch: Ragged, slots: list[int]) -> torch.Tensor:
        """A batched step: x (N, dim) holds the rows of several sequences (batch: their positions
        and RoPE tables, in the order of `slots`) -> the held heads' output (N, dim)."""
        held = self._held(layer)
        caches = [self._cache(held, layer, slot, seq.pos, b - a)
                  for slot, (seq, a, b) in zip(slots, batch.spans())]
        out = held.attention.ragged_over(x, batch, [(c.k, c.v, seq.pos) for c, seq in
                                                    zip(caches, batch.caches)])
        for c, (seq, a, b) in zip(caches, batch.spans()):
            c.pos = seq.pos + b - a
        return out

    def _held(self, layer: int) -> _Layer:
        held = self.layers.get(layer)
        if held is None:
            raise HaloError(f"no attention groups of layer {layer} are held here")
        return held

    def _cache(self, held: _Layer, layer: int, slot: int, pos: int, T: int) -> _Cache:
        """Slot's cache, with room for pos + T positions; an input past its end is an error."""
        cache = held.caches.get(slot)
        if cache is None:
            empty = torch.zeros(len(held.attention.ids), 0, self.args.head_dim)     # (n_kv, 0, hd)
            cache = held.caches[slot] = _Cache(empty, empty.clone())
        if pos > cache.pos:
            raise HaloError(f"attention input of layer {layer} at position {pos}, but the cache "
                            f"holds {cache.pos}: it would have a hole")
        self._reserve(cache, pos + T)
        return cache

    def _reserve(self, cache: _Cache, length: int):
        cap = cache.k.shape[1]
        if length <= cap:
            return
        new = min(max(length, 2 * cap, 64), max(self.args.max_seq_len, length))
        for name in ("k", "v"):
            old = getattr(cache, name)
            grown = torch.zeros(old.shape[0], new, old.shape[2])
            grown[:, :cache.pos] = old[:, :cache.pos]
            setattr(cache, name, grown)

    def regroup(self, layer: int, ids: np.ndarray):
        """Hold KV heads `ids` of `layer` (at start: no cache yet)."""
        ids = np.sort(np.asarray(ids, dtype=np.int64))
        if len(ids):
            self.layers[layer] = _Layer(self.load(layer, ids))

    def reassign(self, heads: dict[int, np.ndarray]):
        """Hold `heads` (layer -> KV heads) from now on, every cache dropped, to be refilled from
        position 0 (a replay of the sequences so far: lead.py). A layer whose heads stay keeps its
        weights; the others are read from the store now."""
        layers = {}
        for layer, ids in heads.items():
            ids = np.sort(np.asarray(ids, dtype=np.int64))
            if not len(ids):
                continue
            old = self.layers.get(layer)
            same = old is not None and np.array_equal(old.attention.ids, ids)
            layers[layer] = _Layer(old.attention if same else self.load(layer, ids))
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
        return sum(2 * c.k.numel() * c.k.element_size() for h in self.layers.values()
                   for c in h.caches.values())
