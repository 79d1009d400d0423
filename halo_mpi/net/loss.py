"""Loss emulation: TCP-like delays on chosen links, held on the sender's side.

A message on a lossy link is held back for as long as real TCP would take to repair its lost
packets (see `LinkLoss`), in both directions between rank 0 and the lossy rank. Holding never
blocks the sender's compute. A link's loss may change at given steps (`--link-loss
2:0@0,2:0.1@50,2:0@150`: a `LossSchedule`), the way a real link turns bad and recovers; a message
is judged by the loss in force at its own step. The testbed (`halo-mpi testbed`) gives real kernel
loss instead (`testbed set` changes it while a job runs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import HaloError

MTU = 1500           # bytes of payload per emulated packet
RTO = 0.200          # Linux TCP minimum retransmission timeout, seconds
RTO_MAX = 120.0      # Linux caps the backed-off timeout here (TCP_RTO_MAX), seconds

LossSchedule = tuple[tuple[int, float], ...]   # ((step, p), ...) sorted: p from that step on


def loss_at(loss: float | LossSchedule, step: int) -> float:
    """The drop probability in force at `step`: a fixed one, or the last change of a schedule at
    or before `step` (0 before its first change)."""
    if not isinstance(loss, tuple):
        return float(loss)
    p = 0.0
    for at, value in loss:
        if at > step:
            break
        p = value
    return p


@dataclass
class LinkLoss:
    """Per-packet loss on the links between rank 0 and chosen ranks, TCP-like consequences.

    model "rto" (the issue's first model): every lost packet of a message costs one RTO (200 ms,
    doubling when the same packet is lost again).
    model "tcp" (default; fitted to real Linux TCP on the testbed, see `halo-mpi bench
    --calibrate-emulation` and jobs/segment_loss.py): most losses of a continuing stream are
    repaired by fast retransmit and early probes within milliseconds; the ~200 ms stalls come from
    a lost *last* segment (a tail-loss probe or RTO). A message of two or more segments stalls with
    probability stall_per_p x p, not growing with size. A one-segment message (HALO's per-layer
    message) stalls only when its tail-loss probe is lost as well: single_per_p2 x p^2 (measured
    for 1188 bytes: 0.008, 0.028, 0.097, 0.260 at 5, 10, 20, 30% loss, i.e. 2.8-3.2 p^2; a linear
    law fitted at 1-5% gave a quarter of that at 30%). A stall doubles when the retransmission is
    lost too, with probability double_per_p x p (fitted 1.18 on the testbed, and 0.9-1.1 for one
    segment at 10-30%; at most 0.9), and never beyond Linux's cap of 120 s, so the model stays
    finite at any p. Otherwise, with probability fast_per_p x p (single_fast_per_p x p for one
    segment), the message is late by fast_lo_ms..fast_hi_ms (log-uniform): a loss repaired by
    fast retransmit or a probe.
    """
    loss: dict[int, float | LossSchedule]   # rank -> packet loss probability on its link with
                                            # rank 0, fixed or changing at given steps
    seed: int = 0
    mtu: int = MTU
    rto: float = RTO
    in_order: bool = False       # hold later messages behind a delayed one (head-of-line)
    model: str = "tcp"
    stall_per_p: float = 1.2
    single_per_p2: float = 2.8
    double_per_p: float = 1.18
    fast_per_p: float = 2.5
    single_fast_per_p: float = 0.7
    fast_lo_ms: float = 1.0
    fast_hi_ms: float = 10.0

    def __post_init__(self):
        if self.model not in ("tcp", "rto"):
            raise HaloError(f"loss model {self.model!r}: choose tcp or rto")
        self._rng = {}

    def link_of(self, src: int, dst: int) -> int:
        return dst if src == 0 else src

    def delay(self, src: int, dst: int, nbytes: int, step: int = 0) -> float:
        """Seconds a message of step `step` is held back on its way from src to dst."""
        p = loss_at(self.loss.get(self.link_of(src, dst), 0.0), step)
        if p <= 0:
            return 0.0
        rng = self._rng.get((src, dst))
        if rng is None:  # deterministic per direction with --seed
            rng = self._rng[(src, dst)] = np.random.default_rng([self.seed, src, dst])
        packets = max(1, -(-nbytes // self.mtu))
        if self.model == "rto":
            losses = rng.geometric(1.0 - min(p, 0.99), size=packets) - 1   # failed tries of each packet
            backoff = np.minimum(2.0 ** np.minimum(losses, 20), RTO_MAX / self.rto)   # capped as Linux does
            return float(self.rto * np.sum(backoff - 1.0))
        u = rng.random()
        if packets > 1:
            stall, fast = min(1.0, self.stall_per_p * p), min(1.0, self.fast_per_p * p)
        else:
            stall, fast = min(1.0, self.single_per_p2 * p * p), min(1.0, self.single_fast_per_p * p)
        if u < stall:
            doublings = rng.geometric(1.0 - min(0.9, self.double_per_p * p)) - 1
            return float(min(self.rto * 2.0 ** min(doublings, 20), RTO_MAX))
        if u < stall + fast:
            lo, hi = np.log10(self.fast_lo_ms / 1e3), np.log10(self.fast_hi_ms / 1e3)
            return float(10 ** rng.uniform(lo, hi))
        return 0.0
