"""The MLP groups one rank holds, per layer (or per (layer, rank): rank 0's backups of other
ranks' groups), and the next plan's groups read in the background.

A re-plan never stalls a token: the groups it moves here are read a slice at a time between steps
(`advance`, within a time budget per step) while the current plan goes on; once they are all
resident the rank says READY, and rank 0 switches every rank to the new plan at the same step
(`switch`). The groups a rank keeps are not read again.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.groups import GroupMLP

LoadGroups = Callable[[int, np.ndarray], GroupMLP]     # (layer, ids) -> the groups' MLP
Key = int | tuple[int, int]                            # a layer, or (layer, rank)


def layer_of(key: Key) -> int:
    return key if isinstance(key, int) else key[0]


@dataclass
class Pending:
    """A plan whose groups are being read: key -> ids wanted, and the keys read so far."""
    version: int
    wanted: dict[Key, np.ndarray]
    built: dict[Key, GroupMLP | None] = field(default_factory=dict)
    seconds: float = 0.0             # spent reading and building

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
            current = self.mlps.get(key)
            if current is not None and np.array_equal(current.ids, ids):
                p.built[key] = current
            else:
                p.built[key] = self.load(layer_of(key), ids) if len(ids) else None
        p.seconds += time.perf_counter() - t0
        return p.done

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
