"""The members' compute speeds, measured while the run goes on (HALO's scheduler on devices
whose speed nobody declared, or that slow down: a Pi that throttles).

The members all-reduce every sub-layer, so each step goes at the pace of the slowest member's
compute. Every member reports its compute time at no extra message, with its logits slice (the
header's `seq`, in microseconds); rank 0 times its own. When the members' compute times differ
by more than SPEED_BAND (placement.py) at CONFIRM steps in a row, each taken as the first
quartile of its last `window` decode steps (the least disturbed: a shared machine's noise only
ever adds time), every member's speed
is re-rated to its rate (bytes of weights computed per second of compute: at batch 1 a layer
reads its weights once; rank 0 knows what each computes from the plan, `Work`) over rank 0's,
and the MLP groups re-planned; the windows start afresh under the new plan. The trigger is the
imbalance of compute times, not a rate's drift: a rate also carries each call's fixed cost, so
a rank that sheds groups looks slower per byte, and re-rating on that would shed more and more.
A satellite's speed is not measured here: to rank 0 a slow satellite is a late one, and its
share follows its on-time rate (placement.py, Replanner).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW = 8            # decode steps a member's speed is judged over
CONFIRM = 3           # steps in a row the imbalance must last
MIN_SECONDS = 1e-5    # a compute shorter than this is not timed well enough to count


class SpeedMeter:
    """Each member's recent decode steps: compute seconds and rates (module docstring)."""

    def __init__(self, window: int = WINDOW):
        self.window = window
        self.rates: dict[int, deque] = {}       # bytes per second of compute
        self.seconds: dict[int, deque] = {}     # compute seconds per step

    def add(self, rank: int, nbytes: float, seconds: float):
        if nbytes <= 0 or seconds < MIN_SECONDS:
            return
        self.rates.setdefault(rank, deque(maxlen=self.window)).append(nbytes / seconds)
        self.seconds.setdefault(rank, deque(maxlen=self.window)).append(seconds)

    def imbalance(self) -> float:
        """The slowest measured member's compute time over the fastest's (1: none yet), each the
        first quartile of its window."""
        t = [quartile(q) for r, q in self.seconds.items() if self.measured(r)]
        return max(t) / min(t) if len(t) > 1 else 1.0

    def forget(self):
        """Measure afresh (a new plan changes what each member computes)."""
        self.rates.clear()
        self.seconds.clear()

    def measured(self, rank: int) -> bool:
        return len(self.rates.get(rank, ())) >= self.window

    def relative(self) -> dict[int, float]:
        """rank -> its rate (third quartile of its window) over rank 0's, for the ranks measured
        over a whole window."""
        if not self.measured(0):
            return {}
        ref = quartile(self.rates[0], 3)
        return {r: quartile(q, 3) / ref for r, q in self.rates.items() if r and self.measured(r)}


def quartile(values, which: int = 1) -> float:
    """The first (or third) quartile of a few values, as one of them."""
    v = sorted(values)
    return v[min(len(v) - 1, which * len(v) // 4)]


@dataclass
class Work:
    """Bytes of weights a member computes in a decode step, from the plan: its KV heads, MLP groups
    and head rows. Item sizes as stored (store.item_bytes): the same on every rank, so the ratios
    hold."""
    attention: list                   # [layer][rank] -> KV heads
    vocab: list[tuple[int, int]]      # rank -> [start, stop) head rows
    attn_bytes: int                   # one KV head's attention weights of one layer
    group_bytes: int                  # one MLP group of one layer
    row_bytes: int                    # one row of the head

    def step(self, rank: int, groups: int) -> float:
        """A decode step of `rank` holding `groups` MLP groups over all layers."""
        heads = sum(len(p[rank]) for p in self.attention)
        start, stop = self.vocab[rank]
        return heads * self.attn_bytes + groups * self.group_bytes + (stop - start) * self.row_bytes
