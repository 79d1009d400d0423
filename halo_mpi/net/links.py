"""Online estimates of each link's normal latency and its on-time record."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass
class LinkEstimate:
    """Online estimate of one link's normal latency, and its on-time record.

    Two kinds of samples, both from partials that arrived while their layer was still open:
    round trips (input sent -> partial back), which say whether a partial was on time (the record
    that drives re-planning), and lags behind the layer's critical partials, which set how long
    rank 0 waits for a non-critical one (`grace`). Retransmission stalls are not normal latency:
    samples above 3x the median (plus the margin) are left out before the quantile is taken.
    """
    factor: float = 1.5          # deadline = factor * quantile + margin
    margin: float = 0.002        # seconds
    initial: float = 0.100       # deadline until there are enough samples
    quantile: float = 0.9
    window: int = 64
    outcome_window: int = 256
    on_time: int = 0
    late: int = 0
    streak: int = 0              # on-time outcomes since the last late one

    def __post_init__(self):
        self.samples: deque = deque(maxlen=self.window)          # round trips, seconds
        self.lags: deque = deque(maxlen=self.window)             # lags behind the critical ones
        self.recent: deque = deque(maxlen=self.outcome_window)   # recent outcomes, for re-planning

    def add_latency(self, seconds: float, lag: float | None = None):
        self.samples.append(seconds)
        if lag is not None:
            self.lags.append(lag)

    def add_outcome(self, on_time: bool):
        self.recent.append(on_time)
        if on_time:
            self.on_time += 1
            self.streak += 1
        else:
            self.late += 1
            self.streak = 0

    @property
    def recent_rate(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 1.0

    def _bound(self, samples: deque) -> float:
        if len(samples) < 4:
            return self.initial
        s = np.fromiter(samples, float)
        normal = s[s <= 3.0 * np.median(s) + self.margin]
        return self.factor * float(np.quantile(normal, self.quantile)) + self.margin

    def deadline(self) -> float:
        """Seconds after the input went out by which a partial counts as on time."""
        return self._bound(self.samples)

    def grace(self) -> float:
        """Seconds rank 0 waits for a non-critical partial once the critical ones are in."""
        return self._bound(self.lags)

    @property
    def on_time_rate(self) -> float:
        n = self.on_time + self.late
        return self.on_time / n if n else 1.0
