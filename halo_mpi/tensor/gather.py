"""The deadline gather: how long rank 0 waits for one layer's partials (HALO sync).

The rule, per layer:
- the critical peers (every peer in strict sync and in prefill; in HALO decode steps the stable
  ranks plus the most important unstable ones, see `SyncPolicy.critical`) are waited for, however
  late;
- every other peer is waited for until `ref + grace`, where `ref` is when the last critical partial
  arrived (or when the gather began, if none is critical) and `grace` is how far that link's
  partial normally lags behind the critical ones (`LinkEstimate.grace`). Counting from `ref`, not
  from the send, leaves out the delays all ranks share (rank 0 running late, shared cores);
- a stalled link, one whose missed partial is still not here a round-trip bound after its input
  went out, gets no grace: real TCP holds whatever follows a lost segment until it is repaired, so
  waiting is no use. A partial that comes back within the round-trip bound of its own input shows
  it delivers again, whatever layer it answers (after a TCP stall the link first delivers its
  backlog, none of it within its bound; and a rank 0 that no longer waits runs ahead of a
  satellite, whose fresh answers then come a layer or two late);
- a message of another step, layer, kind or plan version is discarded and counted, never added in;
  anything but a reply (PARTIAL, ATTN_PARTIAL, LOGITS) is a protocol error.

Attention partials and head logits are gathered with every peer critical (`decoding=False`): they
cannot be dropped (see tensor/lead.py), and their timings stay out of the link estimates,
which describe MLP partials.

Bounds and graces are read from the estimates once per step, as they stood when it began.
Decode steps also feed each link's estimate (round trip and lag of what arrived, on-time outcome of
every peer); prefill steps do not: a chunk of many tokens takes far longer than one token, and its
timings would skew a decode step's bounds.

The clock and the inbox are injected, so tests/test_gather.py drives this with a fake clock and
scripted arrivals, without threads or sleeps.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import HaloError
from ..net.framing import Kind, Message
from ..net.links import LinkEstimate
from .policy import SyncPolicy

CRITICAL_POLL_S = 1.0   # poll timeout while a critical partial is missing: poll returns at an arrival
SENT_KEPT = 256         # layers whose send time is kept (a late partial's round trip)


class Inbox(Protocol):
    """What the gather reads from: the transport, or a scripted twin in tests."""

    def poll(self, timeout: float) -> list[Message]:
        """Messages that arrived, waiting up to `timeout` s for the first one."""


REPLIES = (Kind.PARTIAL, Kind.ATTN_PARTIAL, Kind.LOGITS)


@dataclass(frozen=True)
class LayerKey:
    """The identity a partial must carry to be added into the current layer."""
    step: int
    layer: int
    plan: int           # placement version: a partial computed under an old plan is never used
    kind: Kind = Kind.PARTIAL   # MLP partial, attention partial or head logits

    def matches(self, m: Message) -> bool:
        return (m.kind, m.step, m.layer, m.plan) == (self.kind, self.step, self.layer, self.plan)


@dataclass
class GatherResult:
    """One layer's outcome, for rank 0's statistics."""
    dropped: list[int]          # peers whose partial was not waited for, in `peers` order
    on_time: set[int]           # peers whose partial came back within their round-trip bound
    wait_s: float               # clock seconds spent in the gather
    discarded: Counter = field(default_factory=Counter)   # rank -> stale messages thrown away


@dataclass
class _Layer:
    """The state of one gather while it waits."""
    key: LayerKey
    peers: list[int]
    critical: set[int]                      # waited for without deadline
    bound: dict[int, float]                 # rank -> round-trip bound, fixed for this step
    grace: dict[int, float]                 # rank -> how long past `ref` it is waited for
    covered: frozenset = frozenset()        # peers rank 0 can compute itself: no grace
    got: dict[int, np.ndarray] = field(default_factory=dict)   # rank -> partial (T, dim)
    arrived: dict[int, float] = field(default_factory=dict)    # rank -> clock at arrival
    discarded: Counter = field(default_factory=Counter)

    def missing(self) -> list[int]:
        return [r for r in self.peers if r not in self.got]


class DeadlineGather:
    """Rank 0's gather of one layer's partials under the deadline rule (module docstring).

    Owns the per-link estimates (`links`) and the stalled-link bookkeeping (`missed`), which
    outlive a layer; `gather` returns the partials that arrived in time and a `GatherResult`.
    """

    def __init__(self, inbox: Inbox, policy: SyncPolicy, peers: Iterable[int],
                 clock: Callable[[], float] = time.perf_counter):
        self.inbox, self.policy, self.clock = inbox, policy, clock
        self.sent: dict[tuple[int, int], float] = {}   # (step, layer) -> when its inputs went out
        self.links = {r: LinkEstimate(factor=policy.deadline_factor, margin=policy.deadline_margin,
                                      initial=policy.initial_deadline) for r in peers}
        # covered peers (probes) not waited for: their outcome is judged when the partial comes
        # ((step, layer, rank) -> when its input went out), so a probe's link can earn groups back
        self.judged_later: dict[tuple[int, int, int], float] = {}
        self.missed: dict[int, float] = {}   # rank -> when the input of its missed partial went out,
                                             # while nothing has arrived from it since
        # round-trip bounds and graces, taken once per step: a quantile over a link's samples
        # costs ~40 us, and taking it per layer and peer cost rank 0 ~5 ms per token
        self._bounds_step: int | None = None
        self._bound: dict[int, float] = {}
        self._grace: dict[int, float] = {}

    def add(self, rank: int):
        """A peer from now on (a member demoted to a satellite): its link measured afresh."""
        p = self.policy
        self.links[rank] = LinkEstimate(factor=p.deadline_factor, margin=p.deadline_margin,
                                        initial=p.initial_deadline)
        self._bounds_step = None

    def remove(self, rank: int):
        """No longer a peer (a satellite promoted to member): its link's record goes, so the
        re-planner never rates a member by what it did as a satellite."""
        self.links.pop(rank, None)
        self.missed.pop(rank, None)
        for key in [k for k in self.judged_later if k[2] == rank]:
            del self.judged_later[key]
        self._bounds_step = None

    def bounds(self, step: int) -> tuple[dict[int, float], dict[int, float]]:
        """(round-trip bound, grace) per link, as of the start of `step`."""
        if step != self._bounds_step:
            self._bound = {r: link.deadline() for r, link in self.links.items()}
            self._grace = {r: link.grace() for r, link in self.links.items()}
            self._bounds_step = step
        return self._bound, self._grace

    def gather(self, key: LayerKey, peers: list[int], sent_at: float, shares: dict[int, float],
               decoding: bool, covered: frozenset = frozenset()
               ) -> tuple[dict[int, np.ndarray], GatherResult]:
        """Partials of `peers` for `key`: every critical one, the rest until their deadline.

        sent_at: clock time the layer's inputs went out; shares: rank -> importance share of its
        groups (rank 0's own included, which counts towards the critical share); decoding: False
        in prefill, which waits for every peer and leaves the link estimates alone; covered:
        non-critical peers whose whole partial rank 0 can compute itself (a full backup): they
        get no grace, since waiting would cost more than computing.
        """
        t0 = self.clock()
        peer_shares = {r: shares[r] for r in peers}
        critical = set(peers) if not decoding else self.policy.critical(shares[0], peer_shares)
        bound, grace = self.bounds(key.step)
        w = _Layer(key, list(peers), critical, bound, grace, covered)
        self._take(w, 0.0)       # what is already here, so a link that delivered is not stalled
        ref = self._wait(w, t0 if not critical else None)
        if ref is None:          # every critical partial came last
            ref = max(w.arrived.values(), default=t0)
        on_time = {r for r, at in w.arrived.items() if at - sent_at <= w.bound[r]}
        dropped = w.missing()
        if decoding:
            self._feed_links(w, sent_at, ref, on_time, dropped)
            self.sent[(key.step, key.layer)] = sent_at
            if len(self.sent) > SENT_KEPT:            # the oldest go: insertion order
                del self.sent[next(iter(self.sent))]
        return w.got, GatherResult(dropped, on_time, self.clock() - t0, w.discarded)

    def _wait(self, w: _Layer, ref: float | None) -> float | None:
        """Poll until every peer is in or the last deadline has passed; returns `ref` once known."""
        while len(w.got) < len(w.peers):
            missing, now = w.missing(), self.clock()
            if any(r in w.critical for r in missing):
                timeout = CRITICAL_POLL_S
            else:
                if ref is None:
                    ref = max(w.arrived[r] for r in w.critical)
                last = max(ref + (0.0 if r in w.covered or self.stalled(r, now, w.bound[r]) else w.grace[r])
                           for r in missing)
                if now >= last:
                    break
                timeout = last - now
            self._take(w, timeout)
        return ref

    def stalled(self, r: int, now: float, bound: float) -> bool:
        """A missed partial still not here a whole round-trip bound later: the link is stalled
        (TCP holds what follows a lost segment until it is repaired), so waiting is no use."""
        return r in self.missed and now - self.missed[r] > bound

    def _take(self, w: _Layer, timeout: float):
        for m in self.inbox.poll(timeout):
            if self._receive(m, w):
                w.arrived[m.source] = self.clock()

    def _receive(self, m: Message, w: _Layer) -> bool:
        if m.kind not in REPLIES:
            raise HaloError(f"rank 0 got an unexpected {m.kind.name} message from rank {m.source}")
        if w.key.matches(m):
            self.missed.pop(m.source, None)  # the link delivers again
            w.got[m.source] = m.payload
            return True
        if self._fresh(m, w):
            self.missed.pop(m.source, None)
        self.judge_late(m, w.bound)          # a covered peer's: judged by when it came
        w.discarded[m.source] += 1           # a closed step or layer, or an old plan: never mixed in
        return False

    def _fresh(self, m: Message, w: _Layer) -> bool:
        """Whether a late partial came back within its link's round-trip bound of its own input:
        the link delivers again. Attention partials and logits (always waited for) count too."""
        if m.kind != Kind.PARTIAL:
            return True
        sent = self.sent.get((m.step, m.layer))
        return sent is not None and self.clock() - sent <= w.bound.get(m.source, 0.0)

    def _feed_links(self, w: _Layer, sent_at: float, ref: float, on_time: set[int], dropped: list[int]):
        """Decode steps only: round trips and lags of what arrived, every peer's on-time outcome
        (a waited-for stall counts as late too), and when each dropped partial's input went out."""
        for r, at in w.arrived.items():
            self.links[r].add_latency(at - sent_at, lag=max(0.0, at - ref))
        for r in dropped:
            self.missed.setdefault(r, sent_at)
        for r in w.peers:
            if r in w.covered and r in dropped:      # not waited for: judged when it comes
                self.judged_later[(w.key.step, w.key.layer, r)] = sent_at
            else:
                self.links[r].add_outcome(r in on_time)
        self.expire(w.bound)

    def expire(self, bound: dict[int, float] | None = None):
        """Covered peers' partials not come within their link's bound: late."""
        bound, now = self._bound if bound is None else bound, self.clock()
        for key, sent in list(self.judged_later.items()):
            if now - sent > bound.get(key[2], 0.0) or len(self.judged_later) > SENT_KEPT:
                del self.judged_later[key]
                self.links[key[2]].add_outcome(False)

    def judge_late(self, m: Message, bound: dict[int, float] | None = None):
        """A covered peer's partial met after its layer closed (in a gather, or set aside while
        rank 0 was in the members' all-reduce: lead.py), judged by when it arrived."""
        sent = self.judged_later.pop((m.step, m.layer, m.source), None)
        if sent is not None:
            rtt = (m.arrived_at or self.clock()) - sent
            self.links[m.source].add_latency(rtt)
            bound = self._bound if bound is None else bound     # (the bounds of the last step)
            self.links[m.source].add_outcome(rtt <= bound.get(m.source, 0.0))
