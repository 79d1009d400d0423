"""Static placement of MLP neuron groups on ranks (the scheduler issue makes it adaptive).

Balanced by group count; the groups of lowest importance go to the unstable ranks, the rest are
dealt to the stable ranks (rank 0 included) so that their importance sums come out even.
Every rank computes the same placement from the same inputs, so no message carries it.
"""
from __future__ import annotations

import numpy as np

from .errors import HaloError

Placement = list[list[np.ndarray]]   # placement[layer][rank] -> sorted global group ids


def group_counts(groups: int, size: int, unstable: set[int]) -> list[int]:
    """Near-equal counts; the remainder goes to stable ranks first, rank 0 first."""
    counts = [groups // size] * size
    order = [r for r in range(size) if r not in unstable] + sorted(unstable)
    for r in order[: groups % size]:
        counts[r] += 1
    return counts


def deal(ids: np.ndarray, importance: np.ndarray, ranks: list[int], counts: list[int]) -> dict:
    """Give each group, most important first, to the rank with room and the least importance."""
    held = {r: [] for r in ranks}
    total = {r: 0.0 for r in ranks}
    for g in ids[np.argsort(-importance[ids], kind="stable")]:
        r = min((r for r in ranks if len(held[r]) < counts[r]), key=lambda r: (total[r], r))
        held[r].append(int(g))
        total[r] += float(importance[g])
    return held


def static_placement(importance: np.ndarray, size: int, unstable: set[int] = frozenset()) -> Placement:
    n_layers, groups = importance.shape
    if 0 in unstable:
        raise HaloError("rank 0 coordinates and cannot be unstable; list worker ranks only")
    if len(unstable) >= size:
        raise HaloError(f"all {size} ranks are marked unstable")
    counts = group_counts(groups, size, set(unstable))
    stable = [r for r in range(size) if r not in unstable]
    n_low = sum(counts[r] for r in unstable)
    placement = []
    for layer in range(n_layers):
        order = np.argsort(importance[layer], kind="stable")         # least important first
        held = deal(order[n_low:], importance[layer], stable, counts)
        held.update(deal(order[:n_low], importance[layer], sorted(unstable), counts))
        placement.append([np.array(sorted(held[r]), dtype=np.int64) for r in range(size)])
    return placement


def describe(placement: Placement, importance: np.ndarray) -> str:
    """One readable line: groups and mean importance share per rank."""
    size = len(placement[0])
    parts = []
    for r in range(size):
        n = np.mean([len(p[r]) for p in placement])
        share = np.mean([importance[l, p[r]].sum() for l, p in enumerate(placement)])
        parts.append(f"rank {r}: {n:.0f} groups ({100 * share:.0f}% of importance)")
    return "placement: " + "; ".join(parts)
