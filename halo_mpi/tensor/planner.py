"""Rank 0's placement and re-planning state: which rank holds which MLP groups, rank 0's backups
of satellites' groups, and how a new plan replaces the current one without stalling a token.

A re-plan (a satellite's link re-rated by the re-planner, a satellite found unreachable, a late
rank with nowhere to move whose groups rank 0 backs up) proceeds in two halves:
1. rank 0 sends every worker its groups under plan v+1 (PLAN); every rank, rank 0 too, reads the
   groups it gains a slice at a time between steps (held.py), and says READY once they are
   resident (rank 0's backups of the new plan likewise);
2. once every rank that gains groups is ready, rank 0 switches: the next step's STEP carries v+1
   to the members, its inputs carry v+1 to the satellites, and every rank holds the new groups
   from that step on.
Meanwhile plan v goes on unchanged. Re-plans come one at a time; one proposed while another is
being read waits for the next step after the switch. Under --mem-budget a plan is made only when
the groups it moves fit the room each rank's budget kept for them (reserve.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..net.framing import Kind, json_payload
from ..net.transport import Transport
from .head import HeadRows
from .held import HeldGroups, StepPace
from .placement import (
    SPEED_BAND,
    Placement,
    moved,
    own_groups,
    share_in_room,
)
from .policy import SyncPolicy
from .reserve import ReplanRoom
from .roles import Roles


@dataclass
class PendingPlan:
    """A plan being read; what it changes besides the placement takes effect with it."""
    version: int
    placement: Placement
    waiting: set[int]                # ranks that gain groups and have not said READY
    line: str                        # what proposed it (said again once it is in place)
    unstable: frozenset              # the policy's unstable ranks under it
    probes: set[int]                 # the probe ranks under it
    vocab: list | None = None        # rank -> [start, stop) of the head, where it moves rows
    head: object = None              # rank 0's new head slice, once read
    head_read: bool = False
    attention: Placement | None = None   # [layer][rank] -> KV heads, where a member leaves
    members: list[int] | None = None     # the members under it, where one leaves

    @property
    def plan_read(self) -> bool:
        """Whether rank 0's part of it is read (groups, then its head rows)."""
        return self.vocab is None or self.head_read


class Planner:
    """The current plan (`placement`, `version`), the one being read (`pending`), rank 0's own
    groups (`held`) and backups (`backups`, keyed (layer, rank))."""

    def __init__(self, transport: Transport, placement: Placement, importance: np.ndarray, policy: SyncPolicy,
                 held: HeldGroups, backups: HeldGroups, replanner=None, probes=frozenset(), log=None,
                 room: ReplanRoom | None = None):
        self.t, self.importance, self.policy = transport, importance, policy
        self.placement, self.version = placement, 0
        self.held, self.backups, self.replanner = held, backups, replanner
        self.probes = set(probes)      # ranks whose groups only probe their link: all backed up
        self.stuck_share: dict[int, float] = {}   # late ranks with nowhere to move: share backed up
        self.log = log or (lambda line: None)
        self.room = room                # under --mem-budget: each rank's room for re-planned groups
        self.declined: set[str] = set()  # why plans were not made (room), each said once
        self.speeds = None               # SpeedMeter: the members' measured speeds (set by the lead)
        self.head: HeadRows | None = None   # the head's rows over the members (set by the assembly)
        self.before = None               # the re-planner's ratings before it proposed
        self.resident_bytes = lambda: held.nbytes + backups.nbytes   # all of rank 0's: set by the lead
        self.pending: PendingPlan | None = None
        self.roles = Roles(self)                 # who is a member (roles.py)
        self.unreachable: dict[int, int] = {}    # rank -> step it was found silent
        self.step = 0
        self.replans: list[str] = []
        self.read_s = 0.0                        # rank 0's time reading pending groups
        self.pace = StepPace()
        self.switches: list[tuple[int, Placement]] = [(0, placement)]   # (step, plan in force from it)
        # (`held` comes with the probes' groups already: the assembly reads own_groups once)
        self.backups.mlps = {k: backups.load(k[0], ids) for k, ids in self.wanted_backups(placement).items()}

    def wanted_backups(self, placement: Placement, unstable=None, probes=None) -> dict:
        """Rank 0's copies under `placement` (`backups_wanted`), by default for the policy's
        unstable ranks and the probes in force."""
        if self.policy.mode != "halo":
            return {}
        return backups_wanted(placement, self.importance, self.policy.backup_share,
                              self.policy.unstable if unstable is None else unstable,
                              self.probes if probes is None else probes, self.stuck_share)

    # -- each step
    def begin_step(self, step: int, decoding: bool, links: dict, control: list) -> int:
        """Before step `step`: silence and link changes may propose a plan; a pending one is read
        and switched to once every rank has it. Returns the plan version the step runs under."""
        self.step = step
        self.pace.tick()
        for m in control:
            if m.kind == Kind.READY and self.pending is not None and m.plan == self.pending.version:
                self.pending.waiting.discard(m.source)
        self.watch_silence()
        if decoding and self.roles.enabled and self.pending is None:
            self.roles.maybe_change(links)
        if decoding and self.replanner is not None and self.pending is None:
            self.maybe_replan(links)
        if decoding and self.replanner is not None and self.pending is None and self.speeds is not None:
            self.maybe_rerate()
        if self.pending is not None:
            self.advance()
        return self.version

    def advance(self):
        t0, budget = time.perf_counter(), self.budget
        own = self.held.advance(budget)
        p = self.pending
        if own and not p.plan_read:                  # then rank 0's new head rows, at once
            p.head, p.head_read = self.head.read(p.vocab), True
        spare = budget - (time.perf_counter() - t0)
        backups = self.backups.advance(max(spare, 0.0)) if own else False
        self.read_s += time.perf_counter() - t0
        p = self.pending
        if own and backups and not p.waiting:
            self.held.switch(p.version)
            self.backups.switch(p.version)
            if p.vocab is not None:
                self.head.switch(p.vocab, p.head)
            self.placement, self.version, self.probes = p.placement, p.version, p.probes
            self.policy.unstable = p.unstable
            self.pending = None
            self.switches.append((self.step, p.placement))
            if p.members is not None:
                self.roles.switch(p.members, p.attention)
            self.say(f"{p.line}; in place from step {self.step}")

    # -- proposing plans
    def propose(self, new: Placement, line: str, vocab: list | None = None,
                attention: Placement | None = None, members: list[int] | None = None,
                urgent: bool = False):
        """Plan `new` to every worker (PLAN), and rank 0's part of it read in the background;
        under a budget only if its groups fit every rank's room (else said, and not made).
        vocab: the head's new split over the members, where it moves rows; attention, members:
        where a member leaves (demote). urgent: every rank reads what it gains at once instead of
        a slice a step (a late member stalls every step until the switch: reading costs less)."""
        probes = self.replanner.probes()
        if self.room is not None:
            wanted = {0: own_groups(new, probes)}
            fits, why = self.room.fits(new, wanted)
            if not fits:                 # the ratings stay those of the plan in force
                self.replanner.restore(self.before)
                if why not in self.declined:          # said once: the link is measured again
                    self.declined.add(why)
                    self.say(f"{line}; not made: {why}; the late partials count as missing")
                return
            self.room.take(new, wanted)
        version = self.version + 1
        for r in range(1, self.t.size):
            body = {"mlp": [p[r].tolist() for p in new]}
            if vocab is not None and (r in self.head.members or r in (members or ())):
                body["vocab"] = list(vocab[r])
            if urgent:
                body["urgent"] = True
            if members is not None:
                body["members"] = members
                body["attention"] = [p[r].tolist() for p in attention]
            self.t.send(r, Kind.PLAN, self.step, -1, json_payload(body), plan=version)
        unstable = frozenset(self.replanner.unstable())
        self.stuck_share = {r: s for r, s in self.stuck_share.items() if r in unstable}
        gaining = {r for r in moved(self.placement, new) if r != 0 and r not in self.unreachable}
        if vocab is not None:                       # a member given other head rows reads them
            gaining |= self.head.gaining(vocab)
        self.budget = float("inf") if urgent else self.pace.read_budget()
        self.held.prepare(version, own_groups(new, probes))
        self.backups.prepare(version, self.wanted_backups(new, unstable, probes))
        self.pending = PendingPlan(version, new, gaining, line, unstable, probes, vocab,
                                   attention=attention, members=members)

    def watch_silence(self):
        """A worker silent for the rank timeout (frozen or dead) is unreachable: said once, its MLP
        groups re-placed on the others (their stores hold every group) where the re-planner has
        room; otherwise its partials keep counting as missing. A rank whose silence is fatal (a
        member, any rank in strict sync) ends the run in the transport instead. Should it answer
        again, the next plan reaches it and its link earns its groups back."""
        if self.t.rank_timeout is None:
            return
        for r in self.t.silent():
            if r in self.unreachable or r in self.t.fatal:
                continue
            self.unreachable[r] = self.step
            line = f"rank {r} {self.t.why_silent()} at step {self.step}: unreachable"
            if self.pending is not None:
                self.pending.waiting.discard(r)       # a silent rank's READY will not come
            if self.replanner is None:
                self.say(line + "; its partials count as missing (re-planning is off)")
                continue
            self.before = self.replanner.state()
            new, why = self.replanner.exclude(r, self.placement)
            if new is None or self.pending is not None:
                later = "; once the plan being read is in place" if new is not None else ""
                self.say(f"{line}; {why}{later}")
            else:
                self.propose(new, f"{line}; {why}")

    def maybe_replan(self, links: dict):
        stuck_before = set(self.replanner.said_stuck)
        self.before = self.replanner.state()
        new, line = self.replanner.update(links, self.placement, self.step)
        if new is not None:
            self.propose(new, line)
        elif line:                      # re-rated with nothing to move: said once, in the summary
            self.say(line + self.back_up_stuck(self.replanner.said_stuck - stuck_before))

    def maybe_rerate(self):
        """Members whose compute times drifted SPEED_BAND apart (CONFIRM steps in a row) are
        re-rated to their measured speeds and the MLP groups re-planned (speeds.py); measured
        afresh after."""
        if not self.speeds.due(SPEED_BAND):
            return
        self.before = self.replanner.state()
        new, line = self.replanner.rerate_speeds(self.speeds.ratios(), self.placement, self.step)
        self.speeds.forget()
        vocab = self.head.split(self.replanner.cluster) if line else None
        if vocab is not None:                       # the head rows follow the speeds too
            line = line.replace("; nothing to move", "") + "; " + self.head.describe(vocab)
            self.propose(new if new is not None else self.placement, line, vocab)
        elif new is not None:
            self.propose(new, line)
        elif line:
            self.say(line)

    def say(self, line: str):
        self.replans.append(line)
        self.log(line)

    # -- rank 0's backups
    def back_up_stuck(self, ranks: set[int]) -> str:
        """What is left when a late rank's groups have nowhere to go (two ranks): rank 0 backs
        them up, as many as its memory budget (the device profile's memory_mb) has room for, the
        most important first, and recomputes them when that rank's partial misses its deadline.
        Not in strict sync (it waits anyway) nor under --mem-budget (copies outside the budget).
        The copies are read in the background, as a plan's groups are."""
        if not ranks:
            return ""
        if self.policy.mode != "halo" or self.room is not None:
            return "; its late partials count as missing"
        room = self.replanner.cluster.ranks[0].memory_mb * 1e6 - self.resident_bytes()
        shares, said = stuck_backups(ranks, self.probes, self.placement, self.replanner.group_mb, room)
        self.stuck_share.update(shares)
        if self.stuck_share and self.pending is None:     # read in the background, used once read
            self.propose(self.placement, "backups of late ranks read")
        return "; " + "; ".join(said) if said else ""



def backups_wanted(placement: Placement, importance: np.ndarray, backup_share: float, unstable,
                   probes, stuck_share: dict[int, float]) -> dict[tuple[int, int], np.ndarray]:
    """(layer, rank) -> ids of rank 0's copies: the most important `backup_share` of each
    unstable rank's groups (by static importance), and the share backed up of a rank stuck with
    nowhere to move (a probe's groups are rank 0's own: `own_groups`)."""
    wanted = {}
    for l, placed in enumerate(placement):
        for r in sorted((set(unstable) | set(stuck_share)) - set(probes)):
            if r >= len(placed) or not len(placed[r]):
                continue
            share = max(backup_share, stuck_share.get(r, 0.0))
            n = int(np.ceil(share * len(placed[r]) - 1e-9))
            most = np.argsort(-importance[l][placed[r]], kind="stable")[:n]
            if n:
                wanted[(l, r)] = np.sort(placed[r][most])
    return wanted


def stuck_backups(ranks: set[int], probes, placement: Placement, group_mb: float,
                  room: float) -> tuple[dict[int, float], list[str]]:
    """(rank -> share of its groups rank 0 backs up, what to say) for late ranks with nowhere to
    move, as far as `room` bytes allow, in rank order (Planner.back_up_stuck)."""
    shares, said = {}, []
    for r in sorted(ranks):
        if r in probes:
            said.append(f"rank 0 computes all of rank {r}'s groups already (they probe its link)")
            continue
        held = sum(len(p[r]) for p in placement)
        need = held * group_mb * 1e6
        share = share_in_room(need, room)
        if share <= 0:
            said.append(f"rank 0 has no room to back up rank {r}'s groups: its late partials "
                        f"count as missing")
            continue
        shares[r] = share
        room -= share * need
        said.append(f"rank 0 now backs up {share:.0%} of rank {r}'s {held} groups "
                    f"({share * need / 1e6:.1f} MB) and computes them when its partials are late")
    return shares, said
