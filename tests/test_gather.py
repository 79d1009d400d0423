"""The deadline gather on a fake clock: scripted arrivals, no threads, no sleeps.

Times are binary fractions (0.125, 0.25, ...) so that every expected time is exact.
Fresh links (fewer than 4 samples) have round-trip bound = grace = `initial_deadline` = 0.25 s.
"""
from collections import Counter

import numpy as np
import pytest
import torch

from halo_mpi.errors import HaloError
from halo_mpi.net.framing import Kind, Message
from halo_mpi.net.links import LinkEstimate
from halo_mpi.tensor.gather import SENT_KEPT, DeadlineGather, LayerKey
from halo_mpi.tensor.held import HeldGroups
from halo_mpi.tensor.policy import SyncPolicy
from halo_mpi.tensor.satellites import Satellites

BOUND = 0.25      # a fresh link's round-trip bound and grace


class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class ScriptedTransport:
    """Delivers each scripted message at its clock time. `poll(timeout)` returns what is due; if
    nothing is, it moves the clock to the next arrival within the timeout, or by the whole timeout."""
    rank_timeout = None     # no liveness watch (net/transport.py)

    def __init__(self, clock: FakeClock, script=(), size: int = 4):
        self.clock, self.size = clock, size
        self.script = sorted(script, key=lambda e: e[0])   # [(arrival time, Message)], stable
        self.timeouts: list[float] = []
        self.sent: list[tuple] = []

    def at(self, t: float, m: Message):
        self.script = sorted(self.script + [(t, m)], key=lambda e: e[0])

    def poll(self, timeout: float) -> list[Message]:
        self.timeouts.append(timeout)
        assert len(self.timeouts) < 10_000, "the gather never returned"
        nxt = self.script[0][0] if self.script else float("inf")
        if nxt > self.clock.now:
            self.clock.now = min(nxt, self.clock.now + timeout)
        return self._due()

    def _due(self) -> list[Message]:
        n = sum(1 for t, _ in self.script if t <= self.clock.now)
        due, self.script = [m for _, m in self.script[:n]], self.script[n:]
        return due

    def send(self, dest, kind, step, layer, payload, plan=0, **header):
        self.sent.append((dest, kind, step, layer, plan))


def partial(source: int, step: int = 1, layer: int = 0, plan: int = 0, value: float = 1.0) -> Message:
    return Message(source, Kind.PARTIAL, step, layer, np.full((1, 4), value, np.float32), 0.0, plan=plan)


def halo(unstable=(2,), **kw) -> SyncPolicy:
    kw = {"critical_share": 0.3, "initial_deadline": BOUND, "deadline_factor": 1.0,
          "deadline_margin": 0.0, **kw}
    return SyncPolicy(mode="halo", unstable=frozenset(unstable), **kw)


def setup(policy: SyncPolicy, script=()):
    clock = FakeClock()
    inbox = ScriptedTransport(clock, script)
    return clock, inbox, DeadlineGather(inbox, policy, [1, 2, 3], clock)


KEY = LayerKey(step=1, layer=0, plan=0)
SHARES = {0: 0.25, 1: 0.5, 2: 0.125, 3: 0.125}   # with unstable {2}: rank 1 covers the critical share


# ---------------------------------------------------------------------------------------------

def test_strict_waits_for_every_partial_however_late():
    clock, inbox, g = setup(SyncPolicy(mode="strict", initial_deadline=BOUND),
                            [(0.125, partial(1)), (5.0, partial(2)), (30.0, partial(3))])
    got, res = g.gather(KEY, [1, 2, 3], 0.0, SHARES, decoding=True)
    assert sorted(got) == [1, 2, 3] and res.dropped == []
    assert clock.now == 30.0 and res.wait_s == 30.0
    assert res.on_time == {1}                        # only rank 1 came back within its bound
    assert max(inbox.timeouts) == 1.0                # waited by polls, not by one long sleep


def test_halo_drops_a_late_non_critical_peer_after_its_grace():
    clock, inbox, g = setup(halo(), [(0.5, partial(1)), (0.5, partial(3)), (10.0, partial(2))])
    got, res = g.gather(KEY, [1, 2, 3], 0.0, SHARES, decoding=True)
    assert sorted(got) == [1, 3] and res.dropped == [2]
    assert clock.now == 0.5 + BOUND and res.wait_s == 0.5 + BOUND
    assert g.missed == {2: 0.0}                      # the input of its missed partial went out at 0
    assert [t for t, _ in inbox.script] == [10.0]    # the late partial is left for a later drain


@pytest.mark.parametrize("arrival, dropped, end", [(2.125, [], 2.125), (2.5, [2], 2.0 + BOUND)])
def test_grace_counts_from_the_last_critical_arrival_not_from_the_send(arrival, dropped, end):
    clock, _, g = setup(halo(), [(0.25, partial(1)), (2.0, partial(3)), (arrival, partial(2))])
    got, res = g.gather(KEY, [1, 2, 3], 0.0, SHARES, decoding=True)
    assert res.dropped == dropped and sorted(got) == sorted({1, 2, 3} - set(dropped))
    assert clock.now == end                          # send + grace would have been 0.25
    if not dropped:
        assert list(g.links[2].lags) == [arrival - 2.0]


def test_without_critical_peers_grace_counts_from_the_start_of_the_gather():
    clock, _, g = setup(halo(unstable=(1, 2, 3)), [(1.125, partial(1)), (1.5, partial(2))])
    clock.now = 1.0                                  # rank 0's own share took until 1.0
    got, res = g.gather(KEY, [1, 2], 0.5, {0: 0.5, 1: 0.25, 2: 0.25}, decoding=True)
    assert sorted(got) == [1] and res.dropped == [2]
    assert clock.now == 1.0 + BOUND and res.wait_s == BOUND


def test_a_stalled_link_gets_no_grace_until_it_delivers_again():
    clock, inbox, g = setup(halo(), [(0.5, partial(1)), (0.5, partial(3))])
    _, res = g.gather(LayerKey(1, 0, 0), [1, 2, 3], 0.0, SHARES, decoding=True)
    assert res.dropped == [2] and clock.now == 0.5 + BOUND and g.missed == {2: 0.0}

    # layer 1: rank 2's missed partial is overdue by more than its bound: no grace
    clock.now = 1.0
    inbox.at(1.5, partial(1, layer=1))
    inbox.at(1.5, partial(3, layer=1))
    _, res = g.gather(LayerKey(1, 1, 0), [1, 2, 3], 1.0, SHARES, decoding=True)
    assert res.dropped == [2] and clock.now == 1.5
    assert g.missed == {2: 0.0}                      # still counted from the first miss

    # layer 2: the missed partial itself, 2 s after its input: the backlog draining, still no
    # grace (test_only_a_fresh_partial_ends_a_stall: what ends it)
    clock.now = 2.0
    inbox.at(2.0, partial(2, layer=0))
    inbox.at(2.5, partial(1, layer=2))
    inbox.at(2.5, partial(3, layer=2))
    _, res = g.gather(LayerKey(1, 2, 0), [1, 2, 3], 2.0, SHARES, decoding=True)
    assert res.dropped == [2] and res.discarded == Counter({2: 1})
    assert clock.now == 2.5 and g.missed == {2: 0.0}


@pytest.mark.parametrize("answers, recovers", [(0, False), (1, True)])
def test_only_a_fresh_partial_ends_a_stall(answers, recovers):
    """A late partial ends a stall only if it came back within its link's round-trip bound of its
    own input: the answer to layer 0 (sent at 0.0, back at 2.0) is the backlog of a stalled TCP
    link draining; the answer to layer 1 (sent at 1.75) is fresh, though a layer behind."""
    clock = FakeClock()
    inbox = ScriptedTransport(clock, [(0.5, partial(1)), (0.5, partial(3))])
    g = DeadlineGather(inbox, halo(), [1, 2, 3], clock)
    g.gather(LayerKey(1, 0, 0), [1, 2, 3], 0.0, SHARES, decoding=True)
    assert g.missed == {2: 0.0}
    clock.now = 1.75                                 # layer 1: rank 2 is stalled, not waited for
    inbox.at(1.75, partial(1, layer=1))
    inbox.at(1.75, partial(3, layer=1))
    _, res = g.gather(LayerKey(1, 1, 0), [1, 2, 3], 1.75, SHARES, decoding=True)
    assert res.dropped == [2] and clock.now == 1.75
    clock.now = 2.0                                  # layer 2
    inbox.at(2.0, partial(2, layer=answers))
    inbox.at(2.5, partial(1, layer=2))
    inbox.at(2.5, partial(3, layer=2))
    _, res = g.gather(LayerKey(1, 2, 0), [1, 2, 3], 2.0, SHARES, decoding=True)
    assert res.dropped == [2] and res.discarded == Counter({2: 1})
    assert clock.now == (2.5 + BOUND if recovers else 2.5)     # grace only once it delivers again
    assert g.missed == {2: 2.0 if recovers else 0.0}


def test_a_covered_peer_gets_no_grace():
    """Rank 0 can compute rank 2's whole partial itself: it does not wait for it at all."""
    script = [(0.5, partial(1)), (0.5, partial(3)), (0.5 + BOUND / 2, partial(2))]
    clock, _, g = setup(halo(), script)
    got, res = g.gather(KEY, [1, 2, 3], 0.0, SHARES, decoding=True)
    assert res.dropped == [] and clock.now == 0.5 + BOUND / 2       # not covered: within grace
    clock, _, g = setup(halo(), script)
    got, res = g.gather(KEY, [1, 2, 3], 0.0, SHARES, decoding=True, covered=frozenset({2}))
    assert res.dropped == [2] and clock.now == 0.5 and sorted(got) == [1, 3]


def test_a_missed_partial_within_its_bound_does_not_stall_the_link():
    clock, inbox, g = setup(halo(), [(0.25, partial(1)), (0.25, partial(3))])
    g.links[2] = LinkEstimate(factor=1.0, margin=0.0)
    for _ in range(4):                               # round-trip bound 1.0, grace 0.125
        g.links[2].add_latency(1.0, lag=0.125)
    g.gather(LayerKey(1, 0, 0), [1, 2, 3], 0.0, SHARES, decoding=True)
    assert clock.now == 0.375 and g.missed == {2: 0.0}
    for layer, (sent, end) in enumerate([(0.5, 0.875), (1.0, 1.25)], start=1):
        clock.now = sent                             # 0.875 - 0 <= 1.0: grace; 1.25 - 0 > 1.0: none
        inbox.at(sent + 0.25, partial(1, layer=layer))
        inbox.at(sent + 0.25, partial(3, layer=layer))
        _, res = g.gather(LayerKey(1, layer, 0), [1, 2, 3], sent, SHARES, decoding=True)
        assert res.dropped == [2] and clock.now == end


def test_messages_of_another_step_layer_or_plan_are_discarded_and_counted():
    key = LayerKey(step=5, layer=2, plan=1)
    stale = [partial(1, step=4, layer=2, plan=1, value=9.0),   # a closed step
             partial(1, step=5, layer=1, plan=1, value=9.0),   # another layer
             partial(1, step=5, layer=2, plan=0, value=9.0),   # an old plan
             partial(2, step=4, layer=2, plan=1, value=9.0)]
    clock, _, g = setup(halo(), [(0.0, m) for m in stale] + [(0.5, partial(1, 5, 2, 1, value=1.0)),
                                                             (0.5, partial(3, 5, 2, 1, value=3.0))])
    got, res = g.gather(key, [1, 2, 3], 0.0, SHARES, decoding=True)
    assert sorted(got) == [1, 3] and res.dropped == [2]
    assert np.array_equal(got[1], np.full((1, 4), 1.0, np.float32))
    assert res.discarded == Counter({1: 3, 2: 1})
    assert clock.now == 0.5 + BOUND                  # stale messages are no arrival: ref stays 0.5
    assert list(g.links[2].samples) == []


def test_prefill_waits_for_everyone_and_leaves_the_links_alone():
    clock, _, g = setup(halo(unstable=(2, 3)), [(0.5, partial(1)), (0.5, partial(3)), (50.0, partial(2))])
    got, res = g.gather(KEY, [1, 2, 3], 0.0, SHARES, decoding=False)
    assert sorted(got) == [1, 2, 3] and res.dropped == [] and clock.now == 50.0
    assert all(not link.samples and not link.lags and not link.recent for link in g.links.values())
    assert g.missed == {}


def test_link_estimates_are_fed_only_in_decode_steps():
    script = [(0.25, partial(1)), (0.375, partial(2))]          # rank 3 never answers
    clock, inbox, g = setup(halo(unstable=(2, 3)), script)
    _, res = g.gather(KEY, [1, 2, 3], 0.0, SHARES, decoding=True)
    assert res.on_time == {1} and res.dropped == [3] and clock.now == 0.25 + BOUND
    assert [list(g.links[r].samples) for r in (1, 2, 3)] == [[0.25], [0.375], []]
    assert [list(g.links[r].lags) for r in (1, 2, 3)] == [[0.0], [0.125], []]
    assert [list(g.links[r].recent) for r in (1, 2, 3)] == [[True], [False], [False]]
    assert g.missed == {3: 0.0}

    clock.now = 1.0                                  # the same arrivals in a prefill step
    inbox.at(1.25, partial(1, step=2))
    inbox.at(1.375, partial(2, step=2))
    inbox.at(1.5, partial(3, step=2))
    g.gather(LayerKey(2, 0, 0), [1, 2, 3], 1.0, SHARES, decoding=False)
    assert [len(g.links[r].samples) + len(g.links[r].recent) for r in (1, 2, 3)] == [2, 2, 1]
    assert g.missed == {}                            # rank 3 delivered: no longer stalled


@pytest.mark.parametrize("kind", [Kind.DONE, Kind.INPUT], ids=lambda k: k.name)
def test_a_message_that_is_not_a_partial_is_an_error(kind):
    m = Message(1, kind, 1, 0, np.zeros((1, 4), np.float32), 0.0)
    _, _, g = setup(halo(), [(0.0, m)])
    with pytest.raises(HaloError, match=f"unexpected {kind.name} message from rank 1"):
        g.gather(KEY, [1, 2, 3], 0.0, SHARES, decoding=True)


# ---------------------------------------------------------------------------------------------
# rank 0's side of the satellites: the gather's outcome becomes counters and the step's record

def test_satellites_add_partials_in_time_and_account_the_rest():
    clock = FakeClock()
    t = ScriptedTransport(clock, [(0.0, partial(1, step=0, value=9.0)),   # from a closed step
                                  (0.5, partial(1, value=1.0)), (10.0, partial(2, value=100.0))],
                          size=3)
    placed = [np.array([], np.int64), np.array([1]), np.array([2])]      # one layer, 3 groups
    imp = np.array([0.0, 0.5, 0.5])
    sats = Satellites(t, t, [1, 2], halo(), 1, load_copies=None, backups=HeldGroups({}, None), clock=clock)
    sats.begin_step(1, decoding=True)
    x = torch.zeros(1, 4)
    peers = sats.to_ask(0, placed, None)
    sats.send(0, x, peers, placed, None, version=0)
    out = sats.fold(0, x, peers, placed, imp, None, members_share=0.0, version=0)
    assert torch.equal(out, torch.ones(1, 4))        # rank 1's partial only
    assert [s[:3] for s in t.sent] == [(1, Kind.INPUT, 1), (2, Kind.INPUT, 1)]
    assert sats.used == Counter({1: 1}) and sats.late_discarded == Counter({1: 1})
    rec = sats.records[-1]
    assert rec.dropped_ranks == Counter({2: 1}) and rec.dropped_share == 0.5
    assert sats.wait_s == 0.5 + BOUND and sats.links is sats.deadlines.links
    assert list(sats.links[2].recent) == [False]


def test_a_covered_peer_is_judged_when_its_partial_comes():
    """A probe (covered: rank 0 computes its groups) is not waited for, yet its link is measured:
    a partial that comes within its round-trip bound of its own input is on time, a later one
    late, and one that never comes counts late once SENT_KEPT layers have passed."""
    clock, inbox, g = setup(halo(), [(0.1, partial(1)), (0.1, partial(3))])
    g.gather(KEY, [1, 2, 3], 0.0, SHARES, decoding=True, covered=frozenset({2}))
    assert len(g.links[2].recent) == 0                    # not judged at the close
    inbox.at(0.2, partial(2))                             # within the bound (0.25) of its input
    inbox.at(0.3, partial(1, layer=1))
    inbox.at(0.3, partial(3, layer=1))
    clock.now = 0.2
    g.gather(LayerKey(1, 1, 0), [1, 2, 3], 0.2, SHARES, decoding=True, covered=frozenset({2}))
    assert list(g.links[2].recent) == [True]
    inbox.at(1.4, partial(2, layer=1))                    # 1.2 s after its input: late
    inbox.at(1.5, partial(1, layer=2))
    inbox.at(1.5, partial(3, layer=2))
    clock.now = 1.3
    g.gather(LayerKey(1, 2, 0), [1, 2, 3], 1.3, SHARES, decoding=True, covered=frozenset({2}))
    assert list(g.links[2].recent) == [True, False]
    for layer in range(3, 3 + SENT_KEPT + 1):             # the layer-2 partial never comes
        inbox.at(clock.now, partial(1, layer=layer))
        inbox.at(clock.now, partial(3, layer=layer))
        g.gather(LayerKey(1, layer, 0), [1, 2, 3], clock.now, SHARES, decoding=True,
                 covered=frozenset({2}))
    assert list(g.links[2].recent)[:3] == [True, False, False]


def test_rank_0_counts_a_member_late_when_its_partial_comes_150_ms_after_its_own():
    """The all-reduce's rounds judge each worker member (exchange.py, fake clock): a partial
    within LATE_S of rank 0's own being ready is on time, a later one late; a round where every
    member came late is rank 0's own stall (descheduled), held against none of them."""
    from halo_mpi.net.links import LinkEstimate
    from halo_mpi.net.probe import LATE_S
    from halo_mpi.tensor.exchange import Exchange
    clock = FakeClock()
    t = ScriptedTransport(clock, [(0.01, partial(1)), (LATE_S + 0.05, partial(2))], size=3)
    t.rank = 0
    ex = Exchange(t, [0, 1, 2], collective=False)
    ex.clock, ex.step, ex.measuring = clock, 1, True
    ex.links = {1: LinkEstimate(), 2: LinkEstimate()}
    ex.collect(Kind.PARTIAL, 0, [1, 2])
    assert list(ex.links[1].recent) == [True] and list(ex.links[2].recent) == [False]
    clock.now = 1.0                                   # both late: this rank was held up
    t.at(1.0 + LATE_S + 0.1, partial(1, layer=1))
    t.at(1.0 + LATE_S + 0.1, partial(2, layer=1))
    ex.collect(Kind.PARTIAL, 1, [1, 2])
    assert len(ex.links[1].recent) == 1 and len(ex.links[2].recent) == 1
    ex.measuring = False                              # prefill: not judged
    t.at(clock.now + 1.0, partial(1, layer=2))
    t.at(clock.now + 0.01, partial(2, layer=2))
    ex.collect(Kind.PARTIAL, 2, [1, 2])
    assert len(ex.links[1].recent) == 1
