"""Links measured at start: a short ping-pong on every pair of ranks, before anything is placed.

Nobody declares which link is bad: before the plan is made every pair of ranks exchanges up to
`rounds` round trips of a member's per-layer message (the size the all-reduce will send, so a
link that drops packets shows the stalls it would cause there), and a round trip slower than
LATE_S = 0.150       # a round trip slower than this was a retransmission stall (TCP waits at least
                     # 200 ms), not jitter nor a descheduled rank (tens of ms on a loaded machine)
links start as satellites (tensor mode, HALO sync) with their measured on-time rate as their
reliability, which the re-planner then keeps up to date from the partials (tensor/placement.py).

    survey = measure_links(comm, nbytes=2340)            # every rank, collectively
    unstable = survey.unstable()                        # {2: 0.4}: rank -> on-time rate

The pairs are probed in the rounds of a round-robin tournament (each rank meets one other per
round, so the probes of disjoint pairs run at the same time); a pair's first round trip is not
timed (its peer may still be finishing a round with a lossy link). The lower rank of a pair pings and
stops early once the link is known to be unstable (STOP_LATE late) or after CAP_S; its last ping
says so, so the higher rank's receive is never left posted. Under emulated loss (`--link-loss`)
the pinger adds the delays the transport would hold the two messages for (net/loss.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .devices import STABLE
from .loss import LinkLoss

ROUNDS = 32          # round trips per link at most
LATE_S = 0.050       # a round trip slower than this was a stall (a retransmission), not jitter
STOP_LATE = 2        # this many late round trips make a link unstable (one may be a descheduled
                     # rank on a busy machine, not the link): the pinger stops there
CAP_S = 2.0          # and stop after this long on one link, whatever the count
POLL_S = 1e-4        # sleep between tests of a pending receive (never spin a shared core)
TAG = 31_000         # + the tournament round; the transport's tags start elsewhere


@dataclass
class LinkSurvey:
    """On-time rates of the measured pairs: (a, b) with a < b -> (on time, round trips)."""
    size: int
    counts: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    seconds: float = 0.0         # how long the survey took

    def rate(self, a: int, b: int) -> float:
        on_time, total = self.counts.get((min(a, b), max(a, b)), (0, 0))
        return on_time / total if total else 1.0

    def late(self, a: int, b: int) -> int:
        on_time, total = self.counts.get((min(a, b), max(a, b)), (0, 0))
        return total - on_time

    def bad(self, a: int, b: int, threshold: float = STABLE) -> bool:
        return self.rate(a, b) < threshold and self.late(a, b) >= STOP_LATE

    def unstable(self, threshold: float = STABLE) -> dict[int, float]:
        """rank -> reliability for the ranks that start as satellites. While some link among the
        remaining ranks is below `threshold` with at least STOP_LATE late round trips (one alone
        may be a descheduled rank on a loaded machine: seen at -n 4 on 2 cores), the worker with
        the lowest mean rate over its links to them leaves (rank 0 never: it leads), its worst
        link's rate as its reliability. So a rank behind bad links goes, and not a neighbour it
        drags down; a bad link between two workers costs one of them; a bad link to rank 0 costs
        the worker."""
        left, out = set(range(self.size)), {}
        while len(left) > 1:
            rates = {r: [self.rate(r, s) for s in left if s != r] for r in left if r != 0}
            bad = {r: v for r, v in rates.items() if any(self.bad(r, s, threshold) for s in left if s != r)}
            if not bad:
                break
            r = min(bad, key=lambda r: (sum(bad[r]) / len(bad[r]), -r))
            out[r] = max(min(bad[r]), 0.01)
            left.discard(r)
        return out

    def describe(self) -> str:
        late = [f"{a}-{b} {total - on}/{total} late" for (a, b), (on, total) in sorted(self.counts.items())
                if on < total]
        return f"links measured at start ({self.seconds:.1f} s): " + (", ".join(late) if late else
                                               f"all {len(self.counts)} on time")


def pairings(size: int) -> list[list[tuple[int, int]]]:
    """The rounds of a round-robin tournament (circle method): each pair (a < b) once, each rank
    in at most one pair per round."""
    ranks = list(range(size)) + ([None] if size % 2 else [])
    n, rounds = len(ranks), []
    for _ in range(n - 1):
        pairs = [(ranks[i], ranks[n - 1 - i]) for i in range(n // 2)]
        rounds.append([(min(a, b), max(a, b)) for a, b in pairs if a is not None and b is not None])
        ranks = [ranks[0], ranks[-1]] + ranks[1:-1]
    return rounds


def _wait(request) -> None:
    while not request.Test():
        time.sleep(POLL_S)


def ping(comm, peer: int, tag: int, nbytes: int, rounds: int, loss: LinkLoss | None) -> tuple[int, int]:
    """The lower rank's side: (on-time, round trips) to `peer`."""
    me = comm.Get_rank()
    out, back = np.zeros(max(nbytes, 8), np.uint8), np.empty(max(nbytes, 8), np.uint8)
    flag = out[:8].view(np.int64)                       # 1 on the last ping
    flag[0] = 0                                         # untimed: the peer may still be busy with
    recv = comm.Irecv(back, source=peer, tag=tag)       # its previous pair (on a lossy link), and
    comm.Send(out, dest=peer, tag=tag)                  # the first message sets up the connection
    _wait(recv)
    on_time = done = 0
    t_start = time.perf_counter()
    while True:
        last = (done + 1 >= rounds or done - on_time >= STOP_LATE
                or time.perf_counter() - t_start > CAP_S)
        flag[0] = int(last)
        t0 = time.perf_counter()
        recv = comm.Irecv(back, source=peer, tag=tag)
        comm.Send(out, dest=peer, tag=tag)
        _wait(recv)
        rtt = time.perf_counter() - t0
        if loss is not None:
            rtt += loss.delay(me, peer, out.nbytes) + loss.delay(peer, me, out.nbytes)
        done += 1
        on_time += rtt <= LATE_S
        if last:
            return on_time, done


def pong(comm, peer: int, tag: int, nbytes: int):
    """The higher rank's side: echo every ping until the last."""
    buf = np.empty(max(nbytes, 8), np.uint8)
    while True:
        _wait(comm.Irecv(buf, source=peer, tag=tag))
        comm.Send(buf, dest=peer, tag=tag)
        if buf[:8].view(np.int64)[0]:
            return


def measure_links(comm, nbytes: int, rounds: int = ROUNDS, loss: LinkLoss | None = None) -> LinkSurvey:
    """Every rank, collectively: the survey of all pairs (the same on every rank)."""
    me, size = comm.Get_rank(), comm.Get_size()
    t0 = time.perf_counter()
    mine = {}
    for k, pairs in enumerate(pairings(size)):
        for a, b in pairs:
            if me == a:
                mine[(a, b)] = ping(comm, b, TAG + k, nbytes, rounds, loss)
            elif me == b:
                pong(comm, a, TAG + k, nbytes)
    survey = LinkSurvey(size, seconds=time.perf_counter() - t0)
    for counts in comm.allgather(mine):
        survey.counts.update(counts)
    return survey
