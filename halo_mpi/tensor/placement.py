"""Placement of MLP neuron groups on heterogeneous, unreliable ranks, and re-planning.

Input: a ClusterSpec (per rank: relative compute speed, memory budget, link reliability) and the
groups' importance. Output: placement[layer][rank] -> group ids, such that
- each rank's share of the groups follows its speed times its link's reliability: equal finish
  times on reliable links, and a rank whose partials often miss their deadline holds less of the
  layer, since what it holds is lost as often as its link is late (HALO's load balancing with
  the link counted in; the re-planner updates reliability from the measured on-time rate);
- in HALO sync, an unstable rank holds no more importance than a drop budget allows: (1 -
  reliability) x its share <= the budget, so the expected loss of a layer stays bounded however
  fast that rank is (`importance_caps`);
- no rank holds more than its memory budget (overflow goes to ranks with room, fastest first;
  a cluster that cannot hold the model is a clear error);
- the most important groups sit on the most reliable ranks (rank 0 first), the least important
  on the least reliable ones.
When the online link estimate changes a rank's reliability tier, `replan` moves as few groups as
possible: only groups whose tier changed move, and within a tier groups stay where they are.

The device profile is read by net/devices.py (the same file pipeline mode reads).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import HaloError
from ..net.devices import STABLE, ClusterSpec

Placement = list[list[np.ndarray]]   # placement[layer][rank] -> sorted global group ids
SPEED_BAND = 1.5     # members' compute times this far apart re-rate their speeds (speeds.py): a
                     # shared machine's noise stays within it, a throttled device does not
RERATE = 0.25        # ... and a member's speed is re-rated when measured this far from its rating


def group_counts(cluster: ClusterSpec, groups: int, layers: int, group_mb: float,
                 importance: np.ndarray | None = None, drop_budget: float | None = None,
                 reserved_mb: list[float] | None = None) -> list[int]:
    """Groups per rank per layer: proportional to speed x reliability (the work a rank delivers
    in time), capped by memory (less `reserved_mb`, what the rank's attention groups and head
    slice take) and, with a drop budget, by importance; all groups placed.
    Rank 0's own link is perfect."""
    reserved = reserved_mb or [0.0] * cluster.size
    mem_cap = [max(0, int((s.memory_mb - reserved[r]) // (group_mb * layers)))
               if s.memory_mb != math.inf and group_mb > 0 else groups
               for r, s in enumerate(cluster.ranks)]
    if sum(mem_cap) < groups:
        need = groups * layers * group_mb
        allowed = sum(mem_cap) * layers * group_mb
        raise HaloError(f"the cluster cannot hold the model: {groups} groups x {layers} layers need "
                        f"{need:.0f} MB of MLP weights, the memory budgets allow {allowed:.0f} MB")
    cap, counts = mem_cap, [0] * cluster.size
    if importance is not None and drop_budget is not None:
        cap = [min(c, k) for c, k in zip(mem_cap, importance_caps(cluster, importance, drop_budget))]
        if sum(cap) < groups:        # memory leaves no choice: the unstable ranks hold more
            cap = mem_cap
        for r, d in enumerate(cluster.ranks):      # each unstable link keeps one group to measure
            if r and d.reliability < STABLE and cap[r] >= 1 and sum(counts) < groups:
                counts[r] = 1
    rate = [d.speed * (1.0 if r == 0 else d.reliability) for r, d in enumerate(cluster.ranks)]
    for _ in range(groups - sum(counts)):   # each group to the rank that would deliver it first
        r = min((r for r in range(cluster.size) if counts[r] < cap[r]),
                key=lambda r: ((counts[r] + 1) / rate[r], r))
        counts[r] += 1
    return counts


def importance_caps(cluster: ClusterSpec, importance: np.ndarray, drop_budget: float) -> list[int]:
    """Most groups each rank may hold so that the importance expected to miss its deadline stays
    within `drop_budget` of a layer: an unstable rank r is late about (1 - reliability_r) of the
    time and holds the least important groups, so it may take the k least important ones while
    (1 - reliability_r) x their mean share over layers <= its part of the budget (the budget is
    split evenly over the unstable ranks), and at least one. Stable ranks are always waited for:
    no cap."""
    n_layers, G = importance.shape
    unstable = [r for r, d in enumerate(cluster.ranks) if r and d.reliability < STABLE]
    lowest = np.sort(importance, axis=1).mean(0).cumsum()       # (G,) share of the k+1 least important
    caps = [G] * cluster.size
    for r in unstable:
        late = 1.0 - cluster.ranks[r].reliability
        allowed = int(np.searchsorted(lowest * late, drop_budget / len(unstable), side="right"))
        caps[r] = max(1, allowed)    # one group at least: a link with no traffic is never measured
    return caps


def probe_ranks(cluster: ClusterSpec, importance: np.ndarray, drop_budget: float | None) -> set[int]:
    """Unstable ranks so late that the drop budget allows them no group: each keeps one group as
    a probe of its link, and rank 0 holds a copy of it and computes it whenever its partial is
    missing, so the probe costs no quality and the link can earn work back when it recovers."""
    if drop_budget is None:
        return set()
    lowest = np.sort(importance, axis=1).mean(0)[0]             # the least important group's share
    unstable = [r for r, d in enumerate(cluster.ranks) if r and d.reliability < STABLE]
    return {r for r in unstable
            if (1.0 - cluster.ranks[r].reliability) * lowest > drop_budget / len(unstable)}


def share_in_room(need: float, room: float) -> float:
    """The share of `need` (bytes, MB: any one unit) that fits in `room`: all of it, a part, none."""
    return 1.0 if need <= room else max(0.0, room / need) if need else 0.0


def tiers(cluster: ClusterSpec) -> list[list[int]]:
    """Ranks grouped by reliability, most reliable first; rank 0 always in the first tier."""
    rel = [1.0 if r == 0 else round(s.reliability, 2) for r, s in enumerate(cluster.ranks)]
    levels = sorted(set(rel), reverse=True)
    return [[r for r in range(cluster.size) if rel[r] == lv] for lv in levels]


def plan(importance: np.ndarray, cluster: ClusterSpec, group_mb: float = 0.0,
         previous: Placement | None = None, drop_budget: float | None = None,
         reserved_mb: list[float] | None = None) -> Placement:
    """Placement for every layer; with `previous`, keep each group where it is if its tier allows.
    drop_budget: HALO sync's limit on the importance expected to be lost to late links (None:
    strict sync, where nothing is lost and only speed and reliability set the shares)."""
    n_layers, G = importance.shape
    counts = group_counts(cluster, G, n_layers, group_mb, importance, drop_budget, reserved_mb)
    tier_list = tiers(cluster)
    placement = []
    for layer in range(n_layers):
        order = np.argsort(-importance[layer], kind="stable")        # most important first
        held = {r: [] for r in range(cluster.size)}
        start = 0
        for tier in tier_list:
            n = sum(counts[r] for r in tier)
            mine = order[start:start + n]
            start += n
            before = previous[layer] if previous is not None else None
            assign_within_tier(mine, tier, counts, importance[layer], held, before)
        placement.append([np.array(sorted(held[r]), dtype=np.int64) for r in range(cluster.size)])
    return placement


def assign_within_tier(groups, tier, counts, importance, held, before):
    """Keep groups on their previous rank when it is in this tier and has room; deal the rest so
    that the ranks' importance sums stay even."""
    rest = []
    for g in groups:
        owner = next((r for r in tier if before is not None and g in set(before[r].tolist())), None)
        if owner is not None and len(held[owner]) < counts[owner]:
            held[owner].append(int(g))
        else:
            rest.append(int(g))
    total = {r: float(importance[held[r]].sum()) if held[r] else 0.0 for r in tier}
    for g in rest:                                   # most important first (groups came sorted)
        r = min((r for r in tier if len(held[r]) < counts[r]), key=lambda r: (total[r], r))
        held[r].append(g)
        total[r] += float(importance[g])


def moved(old: Placement, new: Placement) -> dict[int, int]:
    """rank -> groups it must load (summed over layers)."""
    out: dict[int, int] = {}
    for lo, ln in zip(old, new):
        for r, (a, b) in enumerate(zip(lo, ln)):
            n = len(set(b.tolist()) - set(a.tolist()))
            if n:
                out[r] = out.get(r, 0) + n
    return out


def random_placement(n_layers: int, groups: int, cluster: ClusterSpec, seed: int = 0) -> Placement:
    """The ablation: the same counts, groups dealt at random (importance ignored)."""
    rng = np.random.default_rng(seed)
    counts = group_counts(cluster, groups, n_layers, 0.0)
    out = []
    for _ in range(n_layers):
        perm = rng.permutation(groups)
        bounds = np.cumsum([0] + counts)
        out.append([np.sort(perm[bounds[r]:bounds[r + 1]]) for r in range(cluster.size)])
    return out


def describe_plan(placement: Placement, importance: np.ndarray, cluster: ClusterSpec) -> str:
    parts = []
    for r in range(cluster.size):
        n = np.mean([len(p[r]) for p in placement])
        share = np.mean([importance[l, p[r]].sum() for l, p in enumerate(placement)])
        parts.append(f"rank {r} (speed {cluster.ranks[r].speed:g}, rel {cluster.ranks[r].reliability:.2f}): "
                     f"{n:.0f} groups, {100 * share:.0f}% importance")
    return "plan: " + "; ".join(parts)


def own_groups(placement: Placement, probes) -> dict[int, np.ndarray]:
    """layer -> the groups rank 0 computes every step: its own, and those of probe ranks (a
    probe's partial only measures its link; rank 0 computes its group in the same matmuls as its
    own, which costs less than a copy computed apart)."""
    return {l: np.union1d(p[0], np.concatenate([p[r] for r in probes if r < len(p)] or [p[0]]))
            for l, p in enumerate(placement)}


class Replanner:
    """Watches the links' recent on-time rates and re-plans when a rank's reliability changes:
    a stable rank whose rate falls below `drop_below` becomes unstable; an unstable rank whose
    rate is `drift` below (or, over a long record, above) what its plan assumed is re-rated to
    it, so its share follows what its link delivers (with the drop budget, a link late most of
    the time keeps one group: enough to keep measuring it); a long clean record makes it stable.
    """

    def __init__(self, cluster: ClusterSpec, importance: np.ndarray, group_mb: float = 0.0,
                 drop_budget: float | None = None, drop_below: float = 0.9, recover_at: float = 0.995,
                 min_outcomes: int = 16, recover_outcomes: int = 256, drift: float = 0.1):
        self.cluster, self.importance, self.group_mb = cluster, importance, group_mb
        self.drop_budget = drop_budget
        self.drop_below, self.recover_at, self.min_outcomes = drop_below, recover_at, min_outcomes
        # recovering takes a long clean record: a link with 1% loss is on time ~98.8% of the
        # time, and treating it as stable would make rank 0 wait through its 200 ms stalls
        self.recover_outcomes = recover_outcomes
        self.drift = drift
        self.excluded: dict[int, float] = {}     # unreachable rank -> its speed before (exclude)
        self.said_stuck: set[int] = set()        # ranks whose re-rating moved nothing, said once

    def unstable(self) -> set[int]:
        return {r for r, s in enumerate(self.cluster.ranks) if r and s.reliability < STABLE}

    def state(self) -> tuple:
        """What `update` and `exclude` change (the ranks' speed and reliability), to `restore` when
        the plan they gave is not made."""
        return [(s.speed, s.reliability) for s in self.cluster.ranks], dict(self.excluded)

    def restore(self, state: tuple):
        ranks, self.excluded = state[0], dict(state[1])
        for spec, (speed, reliability) in zip(self.cluster.ranks, ranks):
            spec.speed, spec.reliability = speed, reliability

    def probes(self) -> set[int]:
        return probe_ranks(self.cluster, self.importance, self.drop_budget)

    def exclude(self, rank: int, placement: Placement):
        """(new placement, what it did) for a rank found unreachable: its speed and reliability
        set to nearly none, so its groups go to the others wherever memory allows (it may keep
        one to measure its link, as any late link does); (None, why) when there is no room."""
        spec = self.cluster.ranks[rank]
        self.excluded[rank] = spec.speed
        spec.speed, spec.reliability = 1e-6, 0.01
        try:
            new = plan(self.importance, self.cluster, self.group_mb, placement, self.drop_budget)
        except HaloError as e:
            return None, f"no room elsewhere ({e}): its groups count as missing"
        loads = ", ".join(f"rank {r} loads {n}" for r, n in sorted(moved(placement, new).items())) or "none"
        return new, f"groups moved: {loads}"

    def rerate_speeds(self, ratios: dict[int, float], placement: Placement, step: int):
        """(new placement, log line) with each member's speed scaled by `ratios` (rank 0's compute
        time over its own: tensor/speeds.py), else (None, "") when none would change by RERATE
        (smaller moves are a shared machine's noise, and would move groups back and forth).
        The MLP groups move here; the planner moves the head rows (vocab_slices)."""
        changes = [(r, self.cluster.ranks[r].speed, self.cluster.ranks[r].speed * v)
                   for r, v in sorted(ratios.items()) if r not in self.excluded and abs(v - 1) > RERATE]
        if not changes:
            return None, ""
        for r, _, speed in changes:
            self.cluster.ranks[r].speed = speed
        new = plan(self.importance, self.cluster, self.group_mb, placement, self.drop_budget)
        what = ", ".join(f"rank {r} measured speed {new_s:.2f} (was {old:.2f})" for r, old, new_s in changes)
        if not moved(placement, new):
            return None, f"at step {step}: {what}; nothing to move"
        loads = ", ".join(f"rank {r} loads {n}" for r, n in sorted(moved(placement, new).items()))
        return new, f"re-plan at step {step}: {what}; groups moved: {loads}"

    def update(self, links: dict, placement: Placement, step: int):
        """(new placement, log line) when some rank changed tier, else (None, "")."""
        changes = []
        for r, link in links.items():
            if len(link.recent) < self.min_outcomes:
                continue
            if r in self.excluded and link.recent_rate >= self.drop_below:   # it answers again
                self.cluster.ranks[r].speed = self.excluded.pop(r)
            rate, spec = link.recent_rate, self.cluster.ranks[r]
            long_record = len(link.recent) >= self.recover_outcomes
            if spec.reliability >= STABLE:
                if rate < self.drop_below:
                    changes.append((r, spec.reliability, rate))
            elif rate >= self.recover_at and long_record:
                changes.append((r, spec.reliability, 1.0))
            elif rate < spec.reliability - self.drift or (rate > spec.reliability + self.drift
                                                          and long_record):
                changes.append((r, spec.reliability, max(rate, 0.01)))
        if not changes:
            return None, ""
        probes_before = self.probes()
        for r, _, rel in changes:
            self.cluster.ranks[r].reliability = rel
            links[r].recent.clear()                      # judge the new tier on fresh outcomes
        new = plan(self.importance, self.cluster, self.group_mb, placement, self.drop_budget)
        probes = self.probes()
        what = ", ".join(f"rank {r} on-time {new:.2f} (was {old:.2f})" for r, old, new in changes)
        if not moved(placement, new) and probes == probes_before:
            # re-rated, but nothing changes: no new plan version; said once per rank
            first = [r for r, _, _ in changes if r not in self.said_stuck]
            self.said_stuck.update(first)
            if not first:
                return None, ""
            return None, (f"at step {step}: {what}; nothing to move: no other rank has room for "
                          f"its groups, or it already keeps the fewest it can")
        loads = ", ".join(f"rank {r} loads {n}" for r, n in sorted(moved(placement, new).items())) or "none"
        probing = f"; probes (rank 0 computes their groups too): {sorted(probes)}" if probes else ""
        return new, f"re-plan at step {step}: {what}; groups moved: {loads}{probing}"


# ---------------------------------------------------------------------------------------------
# attention groups and the output head

def held_by(attention: Placement, vocab: list[tuple[int, int]], size: int) -> set[int]:
    """Workers holding attention groups (with their K/V caches) or head rows: the ranks whose
    loss HALO sync cannot make up elsewhere."""
    return {r for r in range(1, size)
            if any(len(layer[r]) for layer in attention) or vocab[r][1] > vocab[r][0]}


def holders(cluster: ClusterSpec, sync: str) -> list[int]:
    """Ranks that may hold attention groups and head slices, whose partials are always waited
    for: every rank in strict sync; in HALO sync rank 0 and the stable ranks only, so that an
    unstable link never holds up the step with something that cannot be dropped."""
    return [r for r, d in enumerate(cluster.ranks)
            if r == 0 or sync == "strict" or d.reliability >= STABLE]


def speed_shares(cluster: ClusterSpec, ranks: list[int], total: int) -> dict[int, int]:
    """`total` items split over `ranks` in proportion to their speed (largest remainder, ties
    to the lower rank)."""
    speed = {r: cluster.ranks[r].speed for r in ranks}
    exact = {r: total * s / sum(speed.values()) for r, s in speed.items()}
    counts = {r: int(math.floor(x)) for r, x in exact.items()}
    for r in sorted(ranks, key=lambda r: (-(exact[r] - counts[r]), r))[:total - sum(counts.values())]:
        counts[r] += 1
    return counts


def attention_placement(cluster: ClusterSpec, n_layers: int, n_kv: int, eligible: list[int],
                        previous: Placement | None = None) -> Placement:
    """placement[layer][rank] -> KV heads (attention groups) it holds.

    Each eligible rank holds a share of all n_layers x n_kv groups in proportion to its speed,
    and a layer's groups are spread over as many ranks as possible (they run in parallel), so
    the KV-head count need not divide the ranks: with 3 heads on 2 ranks, one rank holds two
    heads of a layer and one of the next. With `previous`, a group whose rank is still eligible
    stays (it carries its K/V cache); only the others move, to the eligible ranks with the
    fewest groups for their speed."""
    quota = speed_shares(cluster, eligible, n_layers * n_kv)
    held = [[[] for _ in range(cluster.size)] for _ in range(n_layers)]
    count = dict.fromkeys(eligible, 0)
    todo = []
    for layer in range(n_layers):
        for head in range(n_kv):
            owner = None
            if previous is not None:
                owner = next((r for r in eligible if r < len(previous[layer])
                              and head in set(previous[layer][r].tolist())), None)
            if owner is None:
                todo.append((layer, head))
            else:
                held[layer][owner].append(head)
                count[owner] += 1
    for layer, head in todo:   # fewest groups in this layer first, then furthest below quota
        r = min(eligible, key=lambda r: (len(held[layer][r]), (count[r] + 1) / max(quota[r], 1e-9), r))  # noqa: B023
        held[layer][r].append(head)
        count[r] += 1
    return [[np.array(sorted(h), dtype=np.int64) for h in layer] for layer in held]


def rebalance_attention(cluster: ClusterSpec, attention: Placement, eligible: list[int]) -> Placement:
    """`attention` with heads moved to the eligible ranks below their speed quota (a rank just
    promoted to member holds none) from those above it, one head per layer at a time so a
    layer's heads stay spread; the rest stay where they are."""
    held = [[list(h) for h in layer] for layer in attention]
    count = {r: sum(len(layer[r]) for layer in held) for r in eligible}
    quota = speed_shares(cluster, eligible, sum(count.values()))
    for layer in held:
        for g in (r for r in eligible if count[r] < quota[r] and not layer[r]):
            donors = [d for d in eligible if d != g and len(layer[d]) and count[d] > quota[d]]
            if not donors:
                continue
            d = max(donors, key=lambda d: (count[d] - quota[d], len(layer[d]), -d))
            layer[g].append(layer[d].pop())
            count[g], count[d] = count[g] + 1, count[d] - 1
    return [[np.array(sorted(h), dtype=np.int64) for h in layer] for layer in held]


def vocab_slices(cluster: ClusterSpec, vocab: int, eligible: list[int],
                 previous: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """rank -> [start, stop) rows of the output head, contiguous, in proportion to speed over the
    eligible ranks (empty elsewhere). `previous` is kept while all its holders stay eligible."""
    if previous is not None and all(a == b or r in eligible for r, (a, b) in enumerate(previous)):
        return list(previous)
    counts = speed_shares(cluster, eligible, vocab)
    out, start = [], 0
    for r in range(cluster.size):
        n = counts.get(r, 0)
        out.append((start, start + n))
        start += n
    return out
