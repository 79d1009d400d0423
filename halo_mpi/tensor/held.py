"""The MLP groups one rank holds, per layer (or per (layer, rank): rank 0's backups of other
ranks' groups), and the next plan's groups read in the background.

A re-plan never stalls a token: the groups it moves here are read a slice at a time between steps
(`advance`, within half a step's usual time: `StepPace`) while the current plan goes on; once they are all
resident the rank says READY, and rank 0 switches every rank to the new plan at the same step
(`switch`). The groups a rank keeps are not read again. Under --mem-budget (`BudgetedGroups`) the
groups placed at start stay as the loader laid them out and the gained ones are read into the
room the budget kept for re-plans (reserve.py).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.groups import GroupMLP

LoadGroups = Callable[[int, np.ndarray], GroupMLP]     # (layer, ids) -> the groups' MLP
Key = int | tuple[int, int]                            # a layer, or (layer, rank)


def layer_of(key: Key) -> int:
    return key if isinstance(key, int) else key[0]


READ_SHARE = 0.5         # of a step's usual time, spent reading a pending plan's groups per step
READ_MIN_S = 0.005       # ... at least


class StepPace:
    """How long a rank's steps usually take (the median of the last 16), and so how much of each
    step may go to reading a pending plan: a token during a re-plan takes about 1.5x its usual
    time, never a stall. Taken when the plan comes (the steps that read it are slower)."""

    def __init__(self, window: int = 16):
        self.times: deque[float] = deque(maxlen=window + 1)

    def tick(self):
        self.times.append(time.perf_counter())

    def read_budget(self) -> float:
        if len(self.times) < 3:
            return READ_MIN_S
        gaps = sorted(b - a for a, b in zip(self.times, list(self.times)[1:]))
        return max(READ_MIN_S, READ_SHARE * gaps[len(gaps) // 2])


class Pieces:
    """A layer's groups as a few GroupMLPs: a re-plan that gives a rank more groups of a layer adds
    them as a piece of their own instead of reading and rebuilding the whole layer (measured on
    SmolLM2 float32: 2 groups 1.3 ms, the 23 of rank 0's layer 9-12 ms). GroupMLP's calls; `ids`
    in the pieces' order. A piece costs a layer two more matmul calls (~40 us); making the pieces
    one again (a copy of the layer, 6.6 ms) paid off only after ~100 tokens, so they stay."""
    MAX = 3                  # more pieces than this: the layer is read anew, as one

    def __init__(self, pieces: list):
        self.pieces = [p for q in pieces for p in (q.pieces if isinstance(q, Pieces) else [q])]
        self.ids = np.concatenate([p.ids for p in self.pieces])

    def linears(self) -> list:
        return [lin for p in self.pieces for lin in p.linears()]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pieces[0](x)
        for p in self.pieces[1:]:
            out += p(x)
        return out

    def subset(self, x: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
        """keep: (len(ids),) in `ids` order."""
        out, at = torch.zeros(x.shape[0], x.shape[1]), 0
        for p in self.pieces:
            mask, at = keep[at:at + len(p.ids)], at + len(p.ids)
            if mask.any():
                out += p.subset(x, mask)
        return out

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


class Restricted:
    """Some of a module's groups (`ids`, in the module's order): the others are not computed, nor
    freed (the module is kept whole: a later plan may use them again). GroupMLP's calls."""

    def __init__(self, module, ids: np.ndarray):
        self.module = module
        self.mask = np.isin(module.ids, ids)             # (n,) over the module's groups
        self.ids = module.ids[self.mask]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.subset(x, self.mask)

    def subset(self, x: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
        """keep: (len(ids),) in `ids` order."""
        full = np.zeros(len(self.mask), bool)
        full[self.mask] = keep
        return self.module.subset(x, full)

    def linears(self) -> list:
        return self.module.linears()

    @property
    def nbytes(self) -> int:
        return self.module.nbytes


@dataclass
class Pending:
    """A plan whose groups are being read: key -> ids wanted, and the keys read so far."""
    version: int
    wanted: dict[Key, np.ndarray]
    built: dict[Key, GroupMLP | None] = field(default_factory=dict)
    seconds: float = 0.0             # spent reading and building
    extra: dict[Key, object] = field(default_factory=dict)   # under a budget: groups read (BudgetedGroups)

    @property
    def done(self) -> bool:
        return len(self.built) == len(self.wanted)


class HeldGroups:
    """key -> the GroupMLP of the groups held under the current plan (`version`)."""

    def __init__(self, mlps: dict[Key, GroupMLP | None], load: LoadGroups | None, version: int = 0):
        self.mlps, self.load, self.version = dict(mlps), load, version
        self.pending: Pending | None = None

    def ids(self, layer: int) -> np.ndarray:
        mlp = self.mlps.get(layer)
        return mlp.ids if mlp is not None else np.zeros(0, np.int64)

    def partial(self, layer: int, x: torch.Tensor, keep: np.ndarray | None = None) -> torch.Tensor | None:
        """This rank's partial (T, dim) of `layer` for x (T, dim); keep: (G,) over every group of
        the layer, False where --sparsity skips it. None when nothing here contributes."""
        mlp = self.mlps.get(layer)
        if mlp is None:
            return None
        if keep is None:
            return mlp(x)
        mask = keep[mlp.ids]
        return mlp.subset(x, mask) if mask.any() else None

    # -- re-plans
    def prepare(self, version: int, wanted: dict[Key, np.ndarray]):
        """Start reading the groups of plan `version` (key -> ids) that are not held already."""
        self.pending = Pending(version, {l: np.sort(np.asarray(ids, np.int64)) for l, ids in wanted.items()})

    def advance(self, budget_s: float) -> bool:
        """Read and build pending layers until `budget_s` is spent (one layer at least); True once
        every layer of the pending plan is resident."""
        p = self.pending
        if p is None:
            return False
        t0 = time.perf_counter()
        for key, ids in p.wanted.items():
            if key in p.built:
                continue
            if time.perf_counter() - t0 > budget_s and p.built:
                break
            p.built[key] = self._build(key, ids)
        p.seconds += time.perf_counter() - t0
        return p.done

    def _build(self, key: Key, ids: np.ndarray):
        """The groups `ids` of `key`: the held ones as they are, plus only the ones gained, read."""
        current = self.mlps.get(key)
        if not len(ids):
            return None
        if current is None:
            return self.load(layer_of(key), ids)
        held = np.sort(current.ids)
        if np.array_equal(held, ids):
            return current
        gained = np.setdiff1d(ids, held)
        if len(np.setdiff1d(held, ids)) or len(getattr(current, "pieces", [current])) >= Pieces.MAX:
            return self.load(layer_of(key), ids)      # it loses groups (or has pieces enough): anew
        return Pieces([current, self.load(layer_of(key), gained)])

    def switch(self, version: int) -> bool:
        """Hold the pending plan from now on, if it is `version` and resident."""
        p = self.pending
        if p is None or p.version != version or not p.done:
            return False
        self.mlps = {k: m for k, m in p.built.items() if m is not None}
        self.version, self.pending = version, None
        return True

    @property
    def nbytes(self) -> int:
        n = sum(m.nbytes for m in self.mlps.values() if m is not None)
        if self.pending is not None:
            n += sum(m.nbytes for k, m in self.pending.built.items()
                     if m is not None and m is not self.mlps.get(k))
        return n

    @property
    def count(self) -> int:
        return int(sum(len(m.ids) for m in self.mlps.values() if m is not None))


class BudgetedGroups(HeldGroups):
    """HeldGroups under --mem-budget. The modules placed at start (`base`: the loader's, pinned or
    streamed) are never rebuilt; a re-plan's layer is the base restricted to the groups it keeps,
    plus the `extra` groups it gained, read resident once (into the room reserve.py kept) and kept
    while the run goes on, so that a plan that moves groups back reads nothing."""

    def __init__(self, mlps: dict[Key, GroupMLP | None], load: LoadGroups, version: int = 0):
        super().__init__(mlps, load, version)
        self.base = {k: m for k, m in mlps.items() if m is not None}
        self.extra: dict[Key, object] = {}

    def _build(self, key: Key, ids: np.ndarray):
        if not len(ids):
            return None
        base, extra = self.base.get(key), self.extra.get(key)
        have = np.concatenate([m.ids for m in (base, extra) if m is not None] or [np.zeros(0, np.int64)])
        new = np.setdiff1d(ids, have)
        if len(new):                      # read resident; the extra grows (Pieces: nothing re-read)
            piece = self.load(layer_of(key), new)
            extra = piece if extra is None else Pieces([extra, piece])
            self.pending.extra[key] = extra
        parts = []
        for m in (base, extra):
            if m is None:
                continue
            keep = np.intersect1d(m.ids, ids)
            if len(keep) == len(m.ids):
                parts.append(m)
            elif len(keep):
                parts.append(Restricted(m, keep))
        return parts[0] if len(parts) == 1 else Pieces(parts)

    def switch(self, version: int) -> bool:
        p = self.pending
        if not super().switch(version):
            return False
        self.extra.update(p.extra)
        return True

    @property
    def extra_bytes(self) -> int:
        """Bytes of the groups re-plans brought here (within the room kept for them)."""
        return sum(m.nbytes for m in self.extra.values())

    @property
    def nbytes(self) -> int:
        n = sum(m.nbytes for m in self.base.values()) + self.extra_bytes
        if self.pending is not None:         # the groups read so far (the extra grows by them)
            n += sum(m.nbytes - (self.extra[k].nbytes if k in self.extra else 0)
                     for k, m in self.pending.extra.items())
        return n


def loading_stats(loading, groups: HeldGroups) -> dict:
    """{"loading": what the budget covers and how loading went} under --mem-budget, else {}."""
    if loading is None:
        return {}
    return {"loading": {**loading.stats(), "replan_bytes": getattr(groups, "extra_bytes", 0)}}
