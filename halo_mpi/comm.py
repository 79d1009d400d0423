"""The transport between rank 0 and the workers.

One small interface, two implementations:
- `MPITransport`: mpi4py, one posted `Irecv` per peer, `Isend`s tracked until complete, and
  `poll` that waits with `Testsome` plus short sleeps (never a busy loop: ranks outnumber cores);
- `LocalHub` / `LocalTransport`: queues between threads of one process, the twin used in tests.

Every message carries a fixed header (kind, step, layer, shape, send time), so a late message is
recognised and discarded by its receiver, never mixed into a later step. Messages between a pair
are delivered in order, as over one TCP connection.

Loss emulation (`LinkLoss`) lives here too, below the engine: a message of k packets (MTU 1500 B)
on a lossy link is held back by one retransmission timeout (200 ms, doubling when the same packet
is lost again) per lost packet, in both directions between rank 0 and the lossy rank. Holding is
on the sender's side and never blocks the sender's compute. By default each message is delayed
on its own; with in_order=True later messages on the link also wait behind a held one
(head-of-line blocking with RTO-only recovery: the pessimistic extreme, since real TCP recovers
most losses of a continuing stream by fast retransmit within milliseconds; the testbed issue
calibrates this against real kernel TCP).
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from .errors import HaloError

MTU = 1500           # bytes of payload per emulated packet
RTO = 0.200          # Linux TCP minimum retransmission timeout, seconds
# Waiting sleeps between polls, doubling from the shortest to the longest nap while nothing
# arrives, so a reply due soon is seen quickly and an idle rank wakes at most ~1000 times a second.
# When ranks outnumber cores, every early wake-up takes the core from a rank that computes, so the
# naps start longer there. Fixed naps measured at -n 4 on 2 cores: 0.1 ms cost each idle worker
# ~11% of a core; 1 ms added up to 1 ms of latency per layer. HALO_NAP_MIN_S / HALO_NAP_MAX_S
# override the defaults for experiments.
def nap_bounds() -> tuple[float, float]:
    from .runtime import oversubscribed
    lo, hi = (2e-4, 2e-3) if oversubscribed() else (2e-5, 1e-3)
    return (float(os.environ.get("HALO_NAP_MIN_S", lo)), float(os.environ.get("HALO_NAP_MAX_S", hi)))


NAP = 1e-4  # a short sleep for loops outside poll()
TAG = 7              # one tag: order per pair is what identifies nothing; the header does


class Kind(IntEnum):
    INPUT = 1     # rank 0 -> worker: normalized hidden state x (T, dim) for (step, layer)
    PARTIAL = 2   # worker -> rank 0: the worker's partial MLP sum (T, dim) for (step, layer)
    STOP = 3      # rank 0 -> worker: finish; reply with DONE
    DONE = 4      # worker -> rank 0: the worker's statistics (JSON), its last message
    PLAN = 5      # rank 0 -> worker: new group ids for a layer (payload: ids)
    ACTIVATION = 6  # pipeline mode: hidden states (T, dim) of sequence `seq` entering stage `layer`
    TOKEN = 7       # pipeline mode: a sampled token, back to the stage that embeds it


# kind, step, layer, rows, cols, seq (sequence id in pipeline mode), send time (sender's clock)
HEADER = np.dtype([("kind", "<i4"), ("step", "<i4"), ("layer", "<i4"), ("rows", "<i4"),
                   ("cols", "<i4"), ("seq", "<i4"), ("sent_at", "<f8")])


@dataclass
class Message:
    source: int
    kind: Kind
    step: int
    layer: int
    payload: np.ndarray     # float32 (rows, cols); for DONE, uint8 JSON bytes
    sent_at: float
    seq: int = 0

    def json(self) -> dict:
        return json.loads(self.payload.tobytes().decode())


def encode(kind: Kind, step: int, layer: int, payload: np.ndarray, sent_at: float, seq: int = 0) -> bytes:
    if kind == Kind.DONE:
        rows, cols, body = len(payload), 1, np.ascontiguousarray(payload, np.uint8)
    else:
        body = np.ascontiguousarray(payload, np.float32)
        rows, cols = body.shape if body.ndim == 2 else (body.shape[0], 1)
    head = np.array([(int(kind), step, layer, rows, cols, seq, sent_at)], HEADER)
    return head.tobytes() + body.tobytes()


def decode(source: int, data) -> Message:
    head = np.frombuffer(data, HEADER, count=1)[0]
    kind, rows, cols = Kind(int(head["kind"])), int(head["rows"]), int(head["cols"])
    body = np.frombuffer(data, np.uint8 if kind == Kind.DONE else np.float32, offset=HEADER.itemsize,
                         count=rows * cols if kind != Kind.DONE else rows)
    payload = body.copy() if kind == Kind.DONE else body.reshape(rows, cols).copy()
    return Message(source, kind, int(head["step"]), int(head["layer"]), payload,
                   float(head["sent_at"]), int(head["seq"]))


def json_payload(obj) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode(), np.uint8)


# ---------------------------------------------------------------------------------------------
# loss emulation

@dataclass
class LinkLoss:
    """Per-packet loss on the links between rank 0 and chosen ranks, TCP-like consequences.

    model "rto" (the issue's first model): every lost packet of a message costs one RTO (200 ms,
    doubling when the same packet is lost again).
    model "tcp" (default; fitted to real Linux TCP on the testbed, see `halo-mpi bench
    --calibrate-emulation`): most losses of a continuing stream are repaired by fast retransmit
    and early probes within milliseconds; the ~200 ms stalls come from a lost *last* segment (a
    tail-loss probe or RTO), at about stall_per_p x p per message of two or more segments and
    single_per_p x p for a one-segment message, not growing with size; a stall doubles with
    probability double_per_p x p; otherwise, with probability fast_per_p x p, the message is
    late by fast_lo_ms..fast_hi_ms (log-uniform): a loss repaired by fast retransmit.
    """
    loss: dict[int, float]       # rank -> packet loss probability on its link with rank 0
    seed: int = 0
    mtu: int = MTU
    rto: float = RTO
    in_order: bool = False       # hold later messages behind a delayed one (head-of-line)
    model: str = "tcp"
    stall_per_p: float = 1.2
    single_per_p: float = 0.2
    double_per_p: float = 3.5
    fast_per_p: float = 2.5
    fast_lo_ms: float = 1.0
    fast_hi_ms: float = 10.0

    def __post_init__(self):
        if self.model not in ("tcp", "rto"):
            raise HaloError(f"loss model {self.model!r}: choose tcp or rto")
        self._rng = {}

    def link_of(self, src: int, dst: int) -> int:
        return dst if src == 0 else src

    def delay(self, src: int, dst: int, nbytes: int) -> float:
        """Seconds a message is held back on its way from src to dst."""
        p = self.loss.get(self.link_of(src, dst), 0.0)
        if p <= 0:
            return 0.0
        rng = self._rng.get((src, dst))
        if rng is None:  # deterministic per direction with --seed
            rng = self._rng[(src, dst)] = np.random.default_rng([self.seed, src, dst])
        packets = max(1, -(-nbytes // self.mtu))
        if self.model == "rto":
            losses = rng.geometric(1.0 - p, size=packets) - 1   # failed tries of each packet
            return float(self.rto * np.sum(2.0 ** losses - 1.0))
        u = rng.random()
        stall = min(1.0, (self.stall_per_p if packets > 1 else self.single_per_p) * p)
        if u < stall:
            doublings = rng.geometric(1.0 - min(0.9, self.double_per_p * p)) - 1
            return float(self.rto * 2.0 ** doublings)
        if u < stall + min(1.0, self.fast_per_p * p):
            lo, hi = np.log10(self.fast_lo_ms / 1e3), np.log10(self.fast_hi_ms / 1e3)
            return float(10 ** rng.uniform(lo, hi))
        return 0.0


def parse_link_loss(spec: str | None, size: int) -> dict[int, float]:
    """'2:0.05,3:0.05' -> {2: 0.05, 3: 0.05}; one clear error for anything else."""
    out: dict[int, float] = {}
    if not spec:
        return out
    for item in spec.split(","):
        try:
            rank_s, p_s = item.split(":")
            rank, p = int(rank_s), float(p_s)
        except ValueError:
            raise HaloError(f"--link-loss item {item!r} is not RANK:P (e.g. 2:0.05)") from None
        if not 1 <= rank < size:
            raise HaloError(f"--link-loss names rank {rank}, but the workers are ranks 1..{size - 1}")
        if not 0 <= p < 1:
            raise HaloError(f"--link-loss probability {p} for rank {rank} is not in [0, 1)")
        out[rank] = p
    return out


# ---------------------------------------------------------------------------------------------
# the interface

@dataclass
class TransportStats:
    sent: int = 0
    received: int = 0
    held: int = 0                  # messages held back by emulated loss
    held_seconds: float = 0.0      # their total extra delay
    drained_at_close: int = 0      # messages that arrived after the receiver stopped using them
    wait_seconds: float = 0.0      # time spent inside poll


@dataclass
class _Held:
    release_at: float
    dest: int
    data: bytes


class Transport:
    """Base: framing, emulated loss with in-order holding, and the polling loop."""

    def __init__(self, rank: int, size: int, loss: LinkLoss | None = None):
        self.rank, self.size, self.loss = rank, size, loss
        self.stats = TransportStats()
        self._held: dict[int, deque[_Held]] = {}
        self.nap_min, self.nap_max = nap_bounds()

    # -- what subclasses provide
    def _post(self, dest: int, data: bytes): ...
    def _arrived(self) -> list[tuple[int, bytes]]: ...
    def _idle(self, seconds: float): time.sleep(seconds)
    def pending_requests(self) -> int: return 0

    # -- the interface
    def send(self, dest: int, kind: Kind, step: int, layer: int, payload: np.ndarray, seq: int = 0):
        now = time.perf_counter()
        data = encode(kind, step, layer, payload, now, seq)
        self.stats.sent += 1
        d = self.loss.delay(self.rank, dest, len(data)) if self.loss else 0.0
        queue = self._held.setdefault(dest, deque())
        in_order = self.loss is not None and self.loss.in_order
        if d <= 0 and not (in_order and queue):
            self._post(dest, data)
            return
        release = now + d
        if in_order and queue:
            release = max(release, queue[-1].release_at)       # head-of-line blocking
        queue.append(_Held(release, dest, data))
        if not in_order:                                        # keep the queue in release order
            self._held[dest] = deque(sorted(queue, key=lambda h: h.release_at))
        self.stats.held += d > 0
        self.stats.held_seconds += release - now
        self.pump()

    def pump(self, flush: bool = False):
        """Post the held messages whose time has come (all of them with flush)."""
        now = time.perf_counter()
        for dest, queue in self._held.items():
            while queue and (flush or queue[0].release_at <= now):
                self._post(dest, queue.popleft().data)

    def next_release(self) -> float | None:
        times = [q[0].release_at for q in self._held.values() if q]
        return min(times) if times else None

    def poll(self, timeout: float) -> list[Message]:
        """Messages that arrived, waiting up to `timeout` s for the first one (without spinning)."""
        t0 = time.perf_counter()
        end = t0 + max(0.0, timeout)
        nap = self.nap_min
        while True:
            self.pump()
            got = self._arrived()
            now = time.perf_counter()
            if got or now >= end:
                break
            release = self.next_release()   # wake up for a held message's release, too
            self._idle(max(0.0, min(nap, end - now, (release - now) if release else nap)))
            nap = min(2 * nap, self.nap_max)
        self.stats.wait_seconds += time.perf_counter() - t0
        self.stats.received += len(got)
        return [decode(src, data) for src, data in got]

    def close(self) -> int:
        """Flush held messages, complete sends, cancel receives; returns requests still pending."""
        self.pump(flush=True)
        return self.pending_requests()


# ---------------------------------------------------------------------------------------------
# MPI

class MPITransport(Transport):
    """Point-to-point with a fixed set of peers: by default a star (rank 0 talks to every worker,
    a worker to rank 0 only); pipeline mode passes its ring neighbours."""

    def __init__(self, comm, max_bytes: int, loss: LinkLoss | None = None, peers=None):
        super().__init__(comm.Get_rank(), comm.Get_size(), loss)
        from mpi4py import MPI
        self.MPI, self.comm, self.max_bytes = MPI, comm, max_bytes
        if peers is None:
            peers = list(range(1, self.size)) if self.rank == 0 else [0]
        self.peers = sorted(set(peers) - {self.rank})
        self._bufs = {p: np.empty(max_bytes, np.uint8) for p in self.peers}
        self._recvs = [self._irecv(p) for p in self.peers]
        self._sends: list[tuple[object, bytes]] = []   # (request, buffer kept alive until done)

    def _irecv(self, peer: int):
        return self.comm.Irecv([self._bufs[peer], self.MPI.BYTE], source=peer, tag=TAG)

    def _post(self, dest: int, data: bytes):
        if len(data) > self.max_bytes:
            raise HaloError(f"message of {len(data)} bytes exceeds the transport's buffer of "
                            f"{self.max_bytes}; lower --prefill-chunk")
        self._sends.append((self.comm.Isend([data, self.MPI.BYTE], dest=dest, tag=TAG), data))

    def _arrived(self) -> list[tuple[int, bytes]]:
        if self._sends:
            self._sends = [(r, b) for r, b in self._sends if not r.Test()]
        statuses = [self.MPI.Status() for _ in self._recvs]
        done = self.MPI.Request.Testsome(self._recvs, statuses) or []
        # statuses[k] belongs to the k-th completed request, done[k]; each is reposted at once
        out = []
        for i, status in zip(done, statuses):
            peer = self.peers[i]
            out.append((peer, bytes(self._bufs[peer][:status.Get_count(self.MPI.BYTE)])))
            self._recvs[i] = self._irecv(peer)
        return out

    def pending_requests(self) -> int:
        return sum(1 for r in self._recvs if r != self.MPI.REQUEST_NULL) + len(self._sends)

    def close(self, timeout: float = 10.0) -> int:
        self.pump(flush=True)
        end = time.perf_counter() + timeout
        while self._sends and time.perf_counter() < end:
            self._sends = [(r, b) for r, b in self._sends if not r.Test()]
            self._idle(self.nap_min)
        for i, req in enumerate(self._recvs):
            if req == self.MPI.REQUEST_NULL:
                continue
            req.Cancel()
            status = self.MPI.Status()
            req.Wait(status)
            if not status.Is_cancelled():
                self.stats.drained_at_close += 1   # a message matched: it arrived, unused
            self._recvs[i] = self.MPI.REQUEST_NULL
        return self.pending_requests()


# ---------------------------------------------------------------------------------------------
# the single-process twin

class LocalHub:
    """N transports connected by in-memory queues, for ranks run as threads of one process."""

    def __init__(self, size: int, loss: LinkLoss | None = None):
        import queue
        self.size = size
        self.inboxes = [queue.SimpleQueue() for _ in range(size)]
        self.transports = [LocalTransport(self, r, loss) for r in range(size)]


class LocalTransport(Transport):
    def __init__(self, hub: LocalHub, rank: int, loss: LinkLoss | None):
        super().__init__(rank, hub.size, loss)
        self.hub = hub

    def _post(self, dest: int, data: bytes):
        self.hub.inboxes[dest].put((self.rank, data))

    def _arrived(self) -> list[tuple[int, bytes]]:
        inbox, out = self.hub.inboxes[self.rank], []
        while not inbox.empty():
            out.append(inbox.get_nowait())
        return out

    def close(self) -> int:
        self.pump(flush=True)
        return 0


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
        else:
            self.late += 1

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
