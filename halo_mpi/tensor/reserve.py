"""Re-plans under --mem-budget: the room each rank's budget keeps for the MLP groups a re-plan
may move to it.

Under a budget a rank's placed groups are laid out by the loader at start (pinned, or streamed
through load buffers: loading/parts.py), and a re-plan cannot re-lay them while the run goes on.
So the groups it keeps stay where the loader put them (a layer computes the kept ones only), and
the groups it gains are read resident beside them (tensor/held.py, `BudgetedGroups`), into room
the budget kept for them from the start (`Residency.reserve`). How much room: what the rank
would gain in either extreme a re-plan moves towards, every satellite's link lost (its groups
go to the members) or every satellite's link clean (groups come back to it), from the same
placement rule the re-planner uses. A re-plan whose gains would not fit a rank's room is not
made (`ReplanRoom.fits` says which rank and by how much): the late partials count as missing,
as when no rank has room outside a budget.

    room = ReplanRoom(plan.placement, reserve_bytes, group_bytes)
    ok, why = room.fits(new, {0: own_groups(new, probes)})    # before proposing a plan
    room.take(new, ...)                                       # once it is proposed
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np

from ..errors import HaloError
from ..loading.budget import size
from ..net.devices import ClusterSpec
from .placement import Placement, own_groups, plan, probe_ranks

GroupBytes = Callable[[int], int]      # resident bytes of k MLP groups of one layer


def gained(base: Placement, new: Placement, rank: int, probes=frozenset()) -> list[np.ndarray]:
    """Per layer, the groups `rank` computes under `new` (rank 0: the probes' too) that it did
    not hold under `base`."""
    held = own_groups(new, probes) if rank == 0 else {l: n[rank] for l, n in enumerate(new)}
    return [np.setdiff1d(held[l], b[rank]) for l, b in enumerate(base)]


def extreme_plans(importance: np.ndarray, cluster: ClusterSpec, placement: Placement, group_mb: float,
                  drop_budget: float | None, satellites: list[int]) -> list[tuple[Placement, set[int]]]:
    """The placements a re-plan moves towards, with their probe ranks: every satellite's link
    lost, every one clean."""
    out = []
    for speed, reliability in ((1e-6, 0.01), (None, 1.0)):
        c = copy.deepcopy(cluster)
        for r in satellites:
            c.ranks[r].reliability = reliability
            if speed is not None:
                c.ranks[r].speed = speed
        try:
            out.append((plan(importance, c, group_mb, placement, drop_budget),
                        probe_ranks(c, importance, drop_budget)))
        except HaloError:                 # no room for it: that extreme is never planned
            continue
    return out


def reserve_bytes(importance: np.ndarray, cluster: ClusterSpec, placement: Placement, group_mb: float,
                  drop_budget: float | None, satellites: list[int], group_bytes: GroupBytes) -> list[int]:
    """rank -> bytes its budget keeps for re-plans: the most it gains in either extreme plan."""
    extremes = extreme_plans(importance, cluster, placement, group_mb, drop_budget, satellites)
    return [max((sum(group_bytes(len(g)) for g in gained(placement, new, r, probes) if len(g))
                 for new, probes in extremes), default=0) for r in range(cluster.size)]


class ReplanRoom:
    """Rank 0's account of every rank's room for re-planned groups (module docstring). A rank
    keeps the groups a re-plan brought it (a later plan may use them again): `extra` only grows,
    and its bytes must stay within the rank's room."""

    def __init__(self, base: Placement, room: list[int], group_bytes: GroupBytes):
        self.base, self.room, self.group_bytes = base, room, group_bytes
        n_layers, size = len(base), len(room)
        self.extra = [[np.zeros(0, np.int64) for _ in range(n_layers)] for _ in range(size)]

    def _after(self, new: Placement, rank: int, wanted: dict[int, np.ndarray] | None) -> list[np.ndarray]:
        """Per layer, `rank`'s extra groups once it holds `new` (`wanted`: layer -> ids it
        computes, where that is not its placement: rank 0 computes the probes' groups too)."""
        out = []
        for l, (b, e) in enumerate(zip(self.base, self.extra[rank])):
            ids = wanted[l] if wanted is not None else new[l][rank]
            out.append(np.union1d(e, np.setdiff1d(ids, b[rank])))
        return out

    def bytes(self, extra: list[np.ndarray]) -> int:
        return sum(self.group_bytes(len(g)) for g in extra if len(g))

    def fits(self, new: Placement, wanted: dict[int, dict[int, np.ndarray]] | None = None
             ) -> tuple[bool, str]:
        """Whether every rank's extra groups under `new` fit its room; else why not, in words."""
        wanted = wanted or {}
        for r in range(len(self.room)):
            need = self.bytes(self._after(new, r, wanted.get(r)))
            if need > self.room[r]:
                return False, (f"rank {r} would hold {size(need)} of groups beyond those placed at start, "
                               f"its --mem-budget keeps {size(self.room[r])} for re-plans")
        return True, ""

    def take(self, new: Placement, wanted: dict[int, dict[int, np.ndarray]] | None = None):
        wanted = wanted or {}
        for r in range(len(self.room)):
            self.extra[r] = self._after(new, r, wanted.get(r))
