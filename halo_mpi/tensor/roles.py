"""Who is a member: rank 0's record of each worker member's all-reduce rounds and each satellite's
partials, and the plans that demote a late member or promote a satellite whose link recovered.

A member's link holds up every rank on every round, and its attention groups (with their K/V
caches) and head rows cannot be dropped: a member whose rounds come late (exchange.py counts a
round late when its partial comes 150 ms after rank 0's own was ready) is demoted to a satellite.
A satellite whose partials have come on time for long enough joins the members again. Either
way the plan moves attention groups and head rows, is read in the background like any re-plan
(planner.py), and once in place every member holds its new attention groups with empty caches,
which rank 0's replay of the sequence so far refills (lead.py); no cache crosses the bad link.

    roles.maybe_change(satellite_links)   # planner.begin_step, decode steps, no plan pending
    roles.switch(members, attention)      # the plan is in place: the lead switches
"""
from __future__ import annotations

from ..net.devices import UNSTABLE_RELIABILITY
from ..net.links import LinkEstimate
from .placement import Placement, attention_placement, moved, plan, rebalance_attention, vocab_slices

MEMBER_WINDOW = 64     # a member's rounds judged by the last this many (a token of SmolLM2 has 61)
DEMOTE_AFTER = 32      # all-reduce rounds of a member measured before it may be demoted
DEMOTE_BELOW = 0.95    # on-time share of its recent rounds under which it is (2 late in 32: a
                       # stalled round holds every rank ~200 ms; one may be a descheduled rank)
PROMOTE_AFTER = 256    # a satellite's partials on time in a row before it joins the members again,
                       # doubled for each time it was demoted. A satellite's message is one TCP
                       # segment, a member's two or more: at 5% loss one in ~400 of the first
                       # stalls against one in ~10 of the second, so a short clean record says
                       # little: with 32 (64 after a demotion: 2 tokens of SmolLM2's 30 layers) a
                       # rank at 5% went member -> satellite -> member 6 times in 64 tokens (-n 3,
                       # emulated), each change a replay of seconds. After one demotion 512 (~17
                       # tokens of a clean satellite) come in ~35 tokens at 5%, after two 1024 in
                       # ~160, after three practically never


class Roles:
    """The members, their attention groups and the records that change them (module docstring).
    `enabled` in HALO sync with re-planning and no memory budget (assemble.roles_change)."""

    def __init__(self, planner):
        self.planner = planner
        self.members: list[int] = [0]
        self.attention: Placement | None = None  # [layer][rank] -> KV heads (set by the assembly)
        self.links: dict[int, LinkEstimate] = {}  # worker member -> its rounds (the exchange's)
        self.demotions: dict[int, int] = {}      # rank -> times demoted (promotion needs more)
        self.on_switch = None                    # the lead's: members and attention switched
        self.enabled = False

    def start(self, members: list[int], attention: Placement, on_switch) -> dict[int, LinkEstimate]:
        """Roles change from now on; returns the members' records for the exchange to fill."""
        self.members, self.attention, self.on_switch, self.enabled = list(members), attention, on_switch, True
        self.links.update({r: LinkEstimate(outcome_window=MEMBER_WINDOW) for r in members if r})
        return self.links

    def maybe_change(self, satellite_links: dict):
        """One demotion or promotion at most per step, a demotion first."""
        if not self.maybe_demote():
            self.maybe_promote(satellite_links)

    def maybe_demote(self) -> bool:
        """A worker member on time in under DEMOTE_BELOW of its last rounds (at least
        DEMOTE_AFTER) leaves the members; the worst one first, one at a time."""
        late = {r: link.recent_rate for r, link in self.links.items()
                if r in self.members and len(link.recent) >= DEMOTE_AFTER and link.recent_rate < DEMOTE_BELOW}
        if not late or len(self.members) < 2:
            return False
        r = min(late, key=lambda r: (late[r], -r))
        self.demotions[r] = self.demotions.get(r, 0) + 1
        n = len(self.links[r].recent)
        self.change(r, max(min(late[r], UNSTABLE_RELIABILITY), 0.01), [m for m in self.members if m != r],
                    f"rank {r} demoted at step {self.planner.step} (on time in {late[r]:.0%} of its last {n} "
                    f"all-reduce rounds): a satellite now")
        return True

    def maybe_promote(self, satellite_links: dict):
        """A satellite whose last PROMOTE_AFTER x 2^(its demotions) partials were all on time
        joins the members again: the record it needs doubles each time it is demoted, so a link
        that is clean only now and then stops flapping."""
        p = self.planner
        for r, link in sorted(satellite_links.items()):
            if r in self.members or r in p.unreachable or r in p.replanner.excluded:
                continue
            need = PROMOTE_AFTER * 2 ** self.demotions.get(r, 0)
            if link.streak >= need:
                self.change(r, 1.0, sorted(self.members + [r]),
                            f"rank {r} promoted at step {p.step} (its last {need} partials on time): "
                            f"a member again")
                return

    def change(self, rank: int, reliability: float, members: list[int], line: str):
        """Propose the plan with `rank` rated `reliability` and these members: attention groups
        moved to or from it (the others' stay), the head's rows split over the members, MLP groups
        re-placed by the new rating. A demotion is urgent (every step stalls on the late member
        until the switch: the others read what they gain at once); the demoted rank reads its
        groups as a satellite while the others go on (its READY would come over the late link)."""
        p = self.planner
        p.before = p.replanner.state()
        cluster = p.replanner.cluster
        cluster.ranks[rank].reliability = reliability
        if rank in members:
            attention = rebalance_attention(cluster, self.attention, members)
        else:
            n_kv = max(int(h.max(initial=-1)) + 1 for layer in self.attention for h in layer)
            attention = attention_placement(cluster, len(self.attention), n_kv, members,
                                            previous=self.attention)
        vocab = vocab_slices(cluster, p.head.vocab[-1][1], members)
        new = plan(p.importance, cluster, p.replanner.group_mb, p.placement, p.replanner.drop_budget)
        loads = ", ".join(f"rank {r} loads {n}" for r, n in sorted(moved(p.placement, new).items()))
        p.propose(new, f"{line}; attention groups and head rows over ranks {members}, MLP groups moved: "
                       f"{loads or 'none'}; the K/V caches recomputed from the sequence so far",
                  vocab, attention, members, urgent=rank not in members)
        if p.pending is not None and rank not in members:
            p.pending.waiting.discard(rank)

    def switch(self, members: list[int], attention: Placement):
        """The plan is in place: the members' records start afresh (their rounds waited on the
        one gone), and the lead switches (lead.change_members)."""
        self.members, self.attention = list(members), attention
        self.planner.head.members = list(members)
        for r in set(self.links) - set(members):
            del self.links[r]
        for link in self.links.values():
            link.recent.clear()
        for r in members:
            if r and r not in self.links:
                self.links[r] = LinkEstimate(outcome_window=MEMBER_WINDOW)
        self.on_switch(members, attention)
