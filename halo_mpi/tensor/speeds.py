"""The members' compute speeds, measured while the run goes on (HALO's scheduler on devices
whose speed nobody declared, or that slow down: a Pi that throttles).

The members all-reduce every sub-layer, so each step goes at the pace of the slowest member's
compute. Every member reports its compute time at no extra message, with its logits slice (the
header's `seq`, in microseconds); rank 0 times its own. Each member's time is taken as the first
quartile of its last `window` decode steps (the least disturbed: a shared machine's noise only
ever adds time). When the slowest member's time is SPEED_BAND (placement.py) over the fastest's
at CONFIRM steps in a row, every member's speed is scaled by rank 0's time over its own and the
MLP groups and head rows re-planned in proportion (placement.py); the windows start afresh under
the new plan. If time were proportional to work this balances the members in one re-plan; with
work that cannot move (the attention groups, with their K/V caches) and each call's fixed cost it
takes a few, and stops when the times are within the band or nothing is left to move. (A rate,
bytes per second, would be the wrong measure: the fixed costs make a rank that sheds work look
slower per byte, and re-rating on that sheds more and more.) A satellite's speed is not measured
here: to rank 0 a slow satellite is a late one, and its share follows its on-time rate.

    meter = SpeedMeter()
    meter.add(rank, seconds)            # a member's compute seconds in one decode step
    meter.imbalance()                   # slowest member's time over the fastest's
    meter.due(band)                     # past the band CONFIRM steps in a row: re-rate now
    meter.ratios()                      # rank -> rank 0's time over its own
"""
from __future__ import annotations

from collections import deque

WINDOW = 8            # decode steps a member's time is judged over
CONFIRM = 3           # steps in a row the imbalance must last
MIN_SECONDS = 1e-5    # a compute shorter than this is not timed well enough to count


def quartile(values) -> float:
    """The first quartile of a few values, as one of them."""
    v = sorted(values)
    return v[len(v) // 4]


class SpeedMeter:
    """Each member's compute seconds of its recent decode steps (module docstring)."""

    def __init__(self, window: int = WINDOW):
        self.window = window
        self.seconds: dict[int, deque] = {}
        self.imbalanced = 0               # steps in a row the imbalance was past the band

    def add(self, rank: int, seconds: float):
        if seconds >= MIN_SECONDS:
            self.seconds.setdefault(rank, deque(maxlen=self.window)).append(seconds)

    def measured(self, rank: int) -> bool:
        return len(self.seconds.get(rank, ())) >= self.window

    def times(self) -> dict[int, float]:
        return {r: quartile(q) for r, q in self.seconds.items() if self.measured(r)}

    def imbalance(self) -> float:
        """The slowest measured member's time over the fastest's (1: fewer than two measured)."""
        t = self.times().values()
        return max(t) / min(t) if len(t) > 1 else 1.0

    def due(self, band: float) -> bool:
        """Called once a decode step: whether the imbalance has been past `band` CONFIRM steps
        in a row (then counted afresh)."""
        self.imbalanced = self.imbalanced + 1 if self.imbalance() > band else 0
        if self.imbalanced < CONFIRM:
            return False
        self.imbalanced = 0
        return True

    def ratios(self) -> dict[int, float]:
        """rank -> rank 0's time over its own, for the members measured over a whole window."""
        t = self.times()
        return {r: t[0] / v for r, v in t.items() if r} if 0 in t else {}

    def forget(self):
        """Measure afresh (a new plan changes what each member computes)."""
        self.seconds.clear()
