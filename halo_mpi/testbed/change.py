"""Links that change while a job runs: a rank's loss or rate cap replaced on a testbed that is up.

    halo-mpi testbed set --name demo --loss 2:0.1              # now, from another shell
    halo-mpi testbed run --ranks 3 --loss-schedule 2:0.1@20s,2:0@40s -- generate ...

`change_links` replaces the drop rules of a rank in place (`iptables -R`: between two non-zero
probabilities no packet ever meets both rules or none, in each namespace), lifts or sets its tbf
caps (`tc qdisc replace`), and records the new loss in the testbed's state file, so `testbed
status` shows it. The rules of one change live in several namespaces (rank k's own for traffic to
k, every other rank's for traffic from k): they are replaced one namespace after another, a few
milliseconds apart. `LossSchedule` applies changes when a count reaches them: seconds since the
job began (`testbed run --loss-schedule`) or tokens finished (the changing-loss bench).

Delay cannot be changed, nor set: this kernel has no netem (CONFIG_NET_SCH_NETEM is off), and a
fixed delay would need a user-space NFQUEUE program (the kernel has NFQUEUE; none is installed).
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

from . import netns
from .bed import IFACE, Testbed, check_spec, save_state


def change_links(tb: Testbed, loss: dict[int, float] | None = None, rate: dict[int, float] | None = None):
    """Give the named ranks this drop probability (0: none) and rate cap (Mbit/s; 0: none)."""
    loss, rate = dict(loss or {}), dict(rate or {})
    check_spec(tb.ranks, loss, {r: m for r, m in rate.items() if m > 0}, tb.name)
    for lossy, p in sorted(loss.items()):
        netns.set_drop_rule(tb.namespace(lossy), IFACE, p, f"to-r{lossy}")
        for other in range(tb.ranks):
            if other != lossy:
                netns.set_drop_rule(tb.namespace(other), IFACE, p, f"from-r{lossy}",
                                    source=tb.address(lossy))
        tb.loss[lossy] = p
    for rank, mbit in sorted(rate.items()):
        for ns, iface in ((tb.namespace(rank), IFACE), (tb.hub, f"v{rank}")):
            if mbit > 0:
                netns.set_rate(ns, iface, mbit)
            else:
                netns.remove_rate(ns, iface)
        if mbit > 0:
            tb.rate[rank] = mbit
        else:
            tb.rate.pop(rank, None)
    save_state(tb.name, tb.state())


class LossSchedule:
    """Loss changes at counts: [(at, rank, p)], applied in order once `at` is reached; each applied
    one is kept in `applied` with the count at which it was in place."""

    def __init__(self, changes: list[tuple[float, int, float]]):
        self.pending = sorted(changes)
        self.applied: list[dict] = []
        self.error: Exception | None = None      # what stopped `follow`'s thread, if anything

    @classmethod
    def of(cls, schedules: dict[int, tuple[tuple[float, float], ...]]) -> LossSchedule:
        """From net/ranks.py's parse_rank_schedule: {rank: ((at, p), ...)}."""
        return cls([(at, r, p) for r, changes in schedules.items() for at, p in changes])

    def due(self, count: float) -> list[tuple[float, int, float]]:
        """The changes whose `at` the count has reached, taken off `pending`."""
        due = [c for c in self.pending if c[0] <= count]
        self.pending = self.pending[len(due):]
        return due

    def apply_due(self, tb: Testbed, count: float, now=lambda: 0) -> bool:
        """Apply what is due at `count`; `now()` reads the count again once it is in place
        (recorded as `in_place_at`). True if anything changed."""
        due = self.due(count)
        for at, rank, p in due:
            change_links(tb, {rank: p})
            self.applied.append({"at": at, "rank": rank, "loss": p, "asked_at": count,
                                 "in_place_at": now()})
        return bool(due)


def follow(schedule: LossSchedule, tb: Testbed, count, stop: threading.Event, poll_s: float = 0.002,
           log=None) -> threading.Thread:
    """A thread that applies `schedule` as `count()` grows, until `stop` is set."""
    def run():
        try:
            while not stop.is_set() and schedule.pending:
                done = len(schedule.applied)
                schedule.apply_due(tb, count(), count)
                for c in schedule.applied[done:]:
                    (log or (lambda line: None))(f"testbed {tb.name}: rank {c['rank']} loss "
                                                 f"{c['loss']:g} in place at {c['in_place_at']:.1f}")
                stop.wait(poll_s)
        except Exception as e:          # said by the caller once the job ends (see `error`)
            schedule.error = e
    thread = threading.Thread(target=run, name="loss-schedule", daemon=True)
    thread.start()
    return thread


def seconds_since(start: float):
    return lambda: time.monotonic() - start


def stderr_line(line: str):
    print(line, file=sys.stderr, flush=True)


def run_following(tb: Testbed, argv: list[str], schedule: LossSchedule, count, log=None,
                  **run_options) -> subprocess.CompletedProcess:
    """tb.run(argv, **run_options) while a thread applies `schedule` as count() grows (changes at
    0 first, before the job starts); the finished job. A change that fails is raised after it."""
    for _at, rank, p in schedule.pending:
        check_spec(tb.ranks, {rank: p}, {}, tb.name)
    schedule.apply_due(tb, 0)
    stop = threading.Event()
    thread = follow(schedule, tb, count, stop, log=log)
    try:
        done = tb.run(argv, **run_options)
    finally:
        stop.set()
        thread.join()
    if schedule.error is not None:
        raise schedule.error
    return done
