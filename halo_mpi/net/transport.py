"""The transport between ranks: one small interface, MPI underneath.

- `Transport`: framing, emulated loss (held messages), and `poll`, which waits with short sleeps
  that double while nothing arrives (never a busy loop: ranks may outnumber cores);
- `MPITransport`: mpi4py, one posted `Irecv` per peer, `Isend`s tracked until complete;
- `LocalHub` (net/local.py): the in-process twin used in tests.

Messages between a pair are delivered in order, as over one TCP connection.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import HaloError
from .framing import TAG, Kind, Message, decode, encode
from .launch import oversubscribed
from .loss import LinkLoss


# Waiting sleeps between polls, doubling from the shortest to the longest nap while nothing
# arrives, so a reply due soon is seen quickly and an idle rank wakes at most ~1000 times a second.
# When ranks outnumber cores, every early wake-up takes the core from a rank that computes, so the
# naps start longer there. Fixed naps measured at -n 4 on 2 cores: 0.1 ms cost each idle worker
# ~11% of a core; 1 ms added up to 1 ms of latency per layer. HALO_NAP_MIN_S / HALO_NAP_MAX_S
# override the defaults for experiments.
def nap_bounds() -> tuple[float, float]:
    lo, hi = (2e-4, 2e-3) if oversubscribed() else (2e-5, 1e-3)
    return (float(os.environ.get("HALO_NAP_MIN_S", lo)), float(os.environ.get("HALO_NAP_MAX_S", hi)))



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
    def send(self, dest: int, kind: Kind, step: int, layer: int, payload: np.ndarray, seq: int = 0,
             plan: int = 0):
        now = time.perf_counter()
        data = encode(kind, step, layer, payload, now, seq, plan)
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
