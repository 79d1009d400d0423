"""Arrival delays of engine-sized messages under loss on the testbed (ping-pong), and their summary.

    halo-mpi testbed delays --loss 0,0.01,0.03,0.05
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile

from ..errors import HaloError
from ..net.framing import HEADER
from . import netns
from .bed import Testbed

ENGINE_MESSAGE = 576 * 4 + HEADER.itemsize   # SmolLM2: one (1, dim) float32 activation + header


def measure_delays(testbed: Testbed | None, sizes_bytes: list[int], loss: float | None, count: int,
                   peer: int = 1, warmup: int = 20, interval_ms: float = 0.0,
                   timeout: float | None = None, rate: float | None = None) -> dict:
    """Ping-pong between rank 0 and `peer` under `loss` on the peer's link, on the testbed.

    With testbed=None a 2-rank testbed is made for the measurement and removed after; with a
    testbed, `loss` (if not None) first replaces the peer's drop probability (set_loss).
    Returns {"loss", "count", "drops": packets dropped during the run, "tcp": TCP's recovery
    counters summed over both ends, "sizes": {str(size): {"forward_ms": [...], "back_ms":
    [...], "rtt_ms": [...]}}}: forward is the arrival delay rank 0 -> peer, back peer -> rank 0,
    rtt the round trip seen by rank 0.
    """
    if testbed is None:
        with Testbed(max(2, peer + 1), {peer: loss or 0.0}, {peer: rate} if rate else {}) as tb:
            return measure_delays(tb, sizes_bytes, None, count, peer, warmup, interval_ms, timeout)
    if loss is not None:
        testbed.set_loss({**testbed.loss, peer: loss})
    with tempfile.TemporaryDirectory(prefix="halo-delays-") as tmp:
        out = os.path.join(tmp, "delays.json")
        # one round trip may take minutes at 30% loss: TCP doubles its timeout at each lost
        # retransmission, up to Linux's 120 s (seen: over 60 s once in ~650 round trips)
        per_round = 60 + 1200 * (loss or testbed.loss.get(peer, 0.0))
        argv = ["--sizes", ",".join(map(str, sizes_bytes)), "--count", str(count), "--peer", str(peer),
                "--warmup", str(warmup), "--interval-ms", str(interval_ms), "--out", out,
                "--timeout", f"{per_round:g}"]
        before = testbed.drop_counters().get(peer, 0)
        tcp_before = {r: netns.tcp_counters(testbed.namespace(r)) for r in (0, peer)}
        if timeout is None:   # generous: every message stalled by a doubled RTO, and then some
            timeout = 120 + len(sizes_bytes) * (count + warmup) * (0.05 + 4 * (loss or 0))
        done = testbed.run(argv, module="halo_mpi.testbed.pingpong", timeout=timeout, capture=True,
                           down_on_error=False)
        if done.returncode != 0 or not os.path.exists(out):
            lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
            raise HaloError(f"ping-pong on testbed {testbed.name} failed (exit {done.returncode}): "
                            f"{lines[-1].strip() if lines else 'no message'}")
        with open(out) as f:
            result = json.load(f)
    result["drops"] = testbed.drop_counters().get(peer, 0) - before
    result["tcp"] = {}       # summed over both ends: how TCP recovered (timeouts vs probes ...)
    for r, start in tcp_before.items():
        for k, v in netns.tcp_counters(testbed.namespace(r)).items():
            result["tcp"][k] = result["tcp"].get(k, 0) + v - start.get(k, 0)
    result["loss"] = testbed.loss.get(peer, 0.0)
    return result


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """median, p95, p99, max (and mean, n) of delay samples in ms."""
    xs = sorted(samples_ms)
    if not xs:
        return {"n": 0}

    def pct(q: float) -> float:   # nearest-rank percentile: a real sample, never interpolated
        return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))]

    return {"n": len(xs), "median": statistics.median(xs), "p95": pct(95), "p99": pct(99),
            "max": xs[-1], "mean": statistics.fmean(xs)}


STALL_BINS_MS = (1, 10, 100, 300, 1000)


def stall_histogram(samples_ms: list[float]) -> dict[str, int]:
    """Counts per delay band: <1 ms (no loss), 1-10, 10-100 (fast recovery), 100-300 (one
    RTO), 300-1000 (a doubled RTO), >=1000 ms."""
    edges = (0,) + STALL_BINS_MS + (float("inf"),)
    return {f"{lo:g}-{hi:g}": sum(lo <= x < hi for x in samples_ms) for lo, hi in zip(edges, edges[1:])}
