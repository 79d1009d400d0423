"""The transport between ranks: one small interface, MPI underneath.

- `Transport`: framing, emulated loss (held messages), and `poll`, which waits by testing for a
  bounded spin and then with short sleeps that double while nothing arrives (`WaitPolicy`);
- `MPITransport`: mpi4py, one persistent receive per peer (started again as soon as its message
  is decoded), `Isend`s from a pool of send buffers, each returned once its send completes;
- `LocalHub` (net/local.py): the in-process twin used in tests.

Liveness (heartbeats, silent peers) is net/liveness.py's, mixed into `Transport`.

A message is encoded once, straight into its send buffer (one copy of the payload), and decoded
once, straight out of the receive buffer (one copy). Messages between a pair are delivered in
order, as over one TCP connection.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import HaloError
from .framing import HEADER, TAG, Kind, Message, decode, frame, json_payload, write_frame
from .launch import oversubscribed
from .liveness import Liveness
from .loss import LinkLoss


@dataclass
class WaitPolicy:
    """How a rank waits for a message: test in a loop for `spin_s`, then sleep between tests,
    naps doubling from `nap_min_s` to `nap_max_s` while nothing arrives.

    Spinning answers within microseconds but holds a core: worth it when every rank has its own
    core (a nap of 20 us-1 ms cost each layer's round trip ~0.4 ms at -n 2), ruinous when ranks
    outnumber cores (it slows the computing ranks 2-3x), so the default spins only then. Naps:
    fixed naps measured at -n 4 on 2 cores, 0.1 ms cost each idle worker ~11% of a core; 1 ms
    added up to 1 ms of latency per layer. HALO_SPIN_S, HALO_NAP_MIN_S and HALO_NAP_MAX_S
    override the defaults.
    """
    spin_s: float = 0.0
    nap_min_s: float = 2e-5
    nap_max_s: float = 1e-3

    @classmethod
    def default(cls, spin_s: float | None = None) -> WaitPolicy:
        busy = oversubscribed()
        spin = spin_s if spin_s is not None else (0.0 if busy else 5e-3)
        lo, hi = (2e-4, 2e-3) if busy else (2e-5, 1e-3)
        env = os.environ.get
        return cls(float(env("HALO_SPIN_S", spin)), float(env("HALO_NAP_MIN_S", lo)),
                   float(env("HALO_NAP_MAX_S", hi)))


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
    buf: np.ndarray      # the encoded message (its first nbytes)
    nbytes: int


class Transport(Liveness):
    """Base: framing, emulated loss with in-order holding, and the polling loop.

    wire: precision of float payloads on the wire (net/wire.py); wait: how `poll` waits.
    """

    def __init__(self, rank: int, size: int, loss: LinkLoss | None = None, wire: str = "float32",
                 wait: WaitPolicy | None = None):
        self.rank, self.size, self.loss, self.wire = rank, size, loss, wire
        self.wait = wait or WaitPolicy.default()
        self.stats = TransportStats()
        self._held: dict[int, deque[_Held]] = {}
        self._n_held = 0
        self._stash: list[Message] = []            # messages met while waiting in a collective
        self.init_liveness()

    # -- what subclasses provide
    def _buffer(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of at least nbytes for one outgoing message."""
        return np.empty(nbytes, np.uint8)

    def _post(self, dest: int, buf: np.ndarray, nbytes: int): ...
    def _arrived(self) -> list[Message]: ...
    def _idle(self, seconds: float): time.sleep(seconds)
    def _beat(self, dest: int): ...
    def pending_requests(self) -> int: return 0
    max_payload_bytes = 1 << 30   # the largest payload one message may carry

    # -- the interface
    def send(self, dest: int, kind: Kind, step: int, layer: int, payload: np.ndarray, seq: int = 0,
             plan: int = 0, pos: int = 0, exact: bool = False, wire: str | None = None):
        """Float payloads go in the transport's wire precision, or `wire`; exact: as float32
        whatever the wire precision (logits)."""
        now = time.perf_counter()
        f = frame(payload, "float32" if exact else wire or self.wire)
        buf = self._buffer(f.nbytes)
        n = write_frame(buf, kind, step, layer, f, now, seq, plan, pos)
        self.stats.sent += 1
        if self.loss is None:
            self._post(dest, buf, n)
            return
        d = self.loss.delay(self.rank, dest, n, step)
        queue = self._held.setdefault(dest, deque())
        in_order = self.loss is not None and self.loss.in_order
        if d <= 0 and not (in_order and queue):
            self._post(dest, buf, n)
            return
        release = now + d
        if in_order and queue:
            release = max(release, queue[-1].release_at)       # head-of-line blocking
        queue.append(_Held(release, dest, buf, n))
        self._n_held += 1
        if not in_order:                                        # keep the queue in release order
            self._held[dest] = deque(sorted(queue, key=lambda h: h.release_at))
        self.stats.held += d > 0
        self.stats.held_seconds += release - now
        self.pump()

    def send_done(self, stats: dict):
        """A worker's last message: its statistics (DONE) to rank 0, after every message still
        held by emulated loss, so that DONE is the last rank 0 receives from it (MPI keeps one
        sender's messages in order)."""
        self.pump(flush=True)
        self.send(0, Kind.DONE, 0, 0, json_payload(stats))
        self.pump(flush=True)

    def pump(self, flush: bool = False):
        """Post the held messages whose time has come (all of them with flush)."""
        if not self._n_held:
            return
        now = time.perf_counter()
        for queue in self._held.values():
            while queue and (flush or queue[0].release_at <= now):
                h = queue.popleft()
                self._n_held -= 1
                self._post(h.dest, h.buf, h.nbytes)

    def next_release(self) -> float | None:
        times = [q[0].release_at for q in self._held.values() if q]
        return min(times) if times else None

    def _receive(self) -> list[Message]:
        """What arrived, heard-times refreshed and heartbeats taken out."""
        got = self._arrived()
        self.listen(m.source for m in got)
        return [m for m in got if m.kind != Kind.BEAT] if got else got

    def poll(self, timeout: float) -> list[Message]:
        """Messages that arrived, waiting up to `timeout` s for the first one (WaitPolicy)."""
        if self._stash:
            got, self._stash = self._stash, []
            self.stats.received += len(got)
            return got
        t0 = time.perf_counter()
        end = t0 + max(0.0, timeout)
        spin_end = t0 + min(self.wait.spin_s, max(0.0, timeout))
        nap = self.wait.nap_min_s
        while True:
            self.pump()
            got = self._receive()
            now = time.perf_counter()
            if now - self._checked > 0.25:
                self._checked = now
                self.check_fatal()
            if got or now >= end:
                break
            if now < spin_end:
                continue
            release = self.next_release() if self._n_held else None   # wake for a held release too
            self._idle(max(0.0, min(nap, end - now, (release - now) if release else nap)))
            nap = min(2 * nap, self.wait.nap_max_s)
        self.stats.wait_seconds += time.perf_counter() - t0
        self.stats.received += len(got)
        return got

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        """The sum of x (T, dim) float32 over the ranks of the collective group (every rank, or
        the group given at start), the same on all of them: a collective, which every rank of the
        group must call in the same order. An emulated loss holds framed messages back; a
        collective would slip past it, so the engines use framed messages then."""
        raise NotImplementedError

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        """Every group rank's buf (uint8, the same length on all), stacked in rank order:
        (group size, len(buf)). A collective, as `allreduce`."""
        raise NotImplementedError

    def _wait_until(self, done) -> None:
        """Wait as `poll` does (spin, then naps that double) until done() is true; meanwhile
        messages are received (kept for the next poll), so heartbeats keep peers heard."""
        t0 = time.perf_counter()
        spin_end, nap = t0 + self.wait.spin_s, self.wait.nap_min_s
        while not done():
            now = time.perf_counter()
            if now >= spin_end:
                self._idle(nap)
                nap = min(2 * nap, self.wait.nap_max_s)
            if now - self._checked > 0.25:
                self._checked = now
                self._stash.extend(self._receive())
                self.check_fatal()
        self.stats.wait_seconds += time.perf_counter() - t0

    def close(self) -> int:
        """Flush held messages, complete sends, cancel receives; returns requests still pending."""
        self.pump(flush=True)
        return self.pending_requests()


# ---------------------------------------------------------------------------------------------
# MPI

class MPITransport(Transport):
    """Point-to-point with a fixed set of peers: by default a star (rank 0 talks to every worker,
    a worker to rank 0 only); pipeline mode passes its ring neighbours. max_bytes: the largest
    message (a prefill chunk); every receive and send buffer has that size."""

    def __init__(self, comm, max_bytes: int, loss: LinkLoss | None = None, peers=None,
                 wire: str = "float32", wait: WaitPolicy | None = None, group=None):
        super().__init__(comm.Get_rank(), comm.Get_size(), loss, wire, wait)
        from mpi4py import MPI  # here: importing mpi4py.MPI initialises MPI, only a run may do that
        self.MPI, self.comm, self.max_bytes = MPI, comm, max_bytes
        self.group = comm if group is None else group    # the collectives' communicator
        self.max_payload_bytes = max_bytes - HEADER.itemsize
        if peers is None:
            peers = list(range(1, self.size)) if self.rank == 0 else [0]
        self.peers = sorted(set(peers) - {self.rank})
        self._bufs = [np.empty(max_bytes, np.uint8) for _ in self.peers]
        self._recvs = [comm.Recv_init([buf, MPI.BYTE], source=p, tag=TAG)
                       for p, buf in zip(self.peers, self._bufs)]
        self._statuses = [MPI.Status() for _ in self.peers]
        MPI.Prequest.Startall(self._recvs)
        self._sends: list[tuple[object, np.ndarray]] = []   # (request, its buffer) until complete
        self._free: list[np.ndarray] = []                   # send buffers whose send completed

    def _buffer(self, nbytes: int) -> np.ndarray:
        if nbytes > self.max_bytes:
            raise HaloError(f"message of {nbytes} bytes exceeds the transport's buffer of "
                            f"{self.max_bytes}; lower --prefill-chunk")
        return self._free.pop() if self._free else np.empty(self.max_bytes, np.uint8)

    def _post(self, dest: int, buf: np.ndarray, nbytes: int):
        self._sends.append((self.comm.Isend([buf, nbytes, self.MPI.BYTE], dest=dest, tag=TAG), buf))

    def _beat(self, dest: int):
        """From the heartbeat thread: its own small buffers and requests (MPI_THREAD_MULTIPLE)."""
        buf = np.empty(HEADER.itemsize, np.uint8)
        n = write_frame(buf, Kind.BEAT, 0, 0, frame(np.empty((0, 0), np.float32)), time.perf_counter())
        self._beat_sends = [(r, b) for r, b in getattr(self, "_beat_sends", []) if not r.Test()]
        self._beat_sends.append((self.comm.Isend([buf, n, self.MPI.BYTE], dest=dest, tag=TAG), buf))

    def _complete_sends(self):
        still = []
        for req, buf in self._sends:
            if req.Test():
                self._free.append(buf)
            else:
                still.append((req, buf))
        self._sends = still

    def _arrived(self) -> list[Message]:
        if self._sends:
            self._complete_sends()
        done = self.MPI.Request.Testsome(self._recvs, self._statuses)
        if not done:
            return []
        # each completed receive is decoded (one copy) and started again at once
        out = []
        for i in done:
            out.append(decode(self.peers[i], self._bufs[i]))
            self._recvs[i].Start()
        return out

    def pending_requests(self) -> int:
        return sum(1 for r in self._recvs if r != self.MPI.REQUEST_NULL) + len(self._sends)

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        req = self.group.Iallreduce(x, out, op=self.MPI.SUM)   # waited for by the WaitPolicy, not
        self._wait_until(req.Test)                              # in MPI (a blocking wait spins)
        return out

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        out = np.empty((self.group.Get_size(), buf.size), np.uint8)
        req = self.group.Iallgather([buf, self.MPI.BYTE], [out, self.MPI.BYTE])
        self._wait_until(req.Test)
        return out

    def close(self, timeout: float = 10.0) -> int:
        self.stop_beats()
        self.pump(flush=True)
        end = time.perf_counter() + timeout
        while self._sends and time.perf_counter() < end:
            self._complete_sends()
            self._idle(self.wait.nap_min_s)
        for i, req in enumerate(self._recvs):
            if req == self.MPI.REQUEST_NULL:
                continue
            req.Cancel()
            status = self.MPI.Status()
            req.Wait(status)
            if not status.Is_cancelled():
                self.stats.drained_at_close += 1   # a message matched: it arrived, unused
            req.Free()
            self._recvs[i] = self.MPI.REQUEST_NULL
        return self.pending_requests()
