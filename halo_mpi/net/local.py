"""The single-process twin of the MPI transport: ranks as threads, queues as links."""
from __future__ import annotations

import queue
import threading

import numpy as np

from ..errors import HaloError
from .framing import Kind, Message, decode, frame, write_frame
from .loss import LinkLoss
from .transport import Transport, WaitPolicy


class LocalHub:
    """N transports connected by in-memory queues, for ranks run as threads of one process."""

    def __init__(self, size: int, loss: LinkLoss | None = None, wire: str = "float32"):
        self.size = size
        self.inboxes = [queue.SimpleQueue() for _ in range(size)]
        # threads share the cores: they wait by napping, never by spinning
        wait = WaitPolicy(spin_s=0.0)
        self.transports = [LocalTransport(self, r, loss, wire, wait) for r in range(size)]
        self._rounds: dict[tuple, dict[int, np.ndarray]] = {}   # (group, call) -> rank -> its part
        self._calls: dict[tuple, int] = {}                         # (group, rank) -> calls so far
        self._cv = threading.Condition()

    def _gather(self, rank: int, x: np.ndarray, group: tuple[int, ...], timeout: float) -> list[np.ndarray]:
        """Every group rank's x, in rank order, once all have called (ranks are threads)."""
        with self._cv:
            n = self._calls.get((group, rank), 0)
            self._calls[(group, rank)] = n + 1
            parts = self._rounds.setdefault((group, n), {})
            parts[rank] = x
            self._cv.notify_all()
            if not self._cv.wait_for(lambda: len(parts) >= len(group), timeout):
                raise HaloError(f"collective {n}: ranks {sorted(set(group) - set(parts))} never came")
            if all(self._calls.get((group, r), 0) > n for r in group):   # every rank has its result
                self._rounds.pop((group, n), None)
            return [parts[r] for r in group]

    def allreduce(self, rank: int, x: np.ndarray, group: tuple[int, ...],
                  timeout: float = 60.0) -> np.ndarray:
        """The group's x summed in rank order."""
        parts = self._gather(rank, x, group, timeout)
        out = parts[0].copy()
        for p in parts[1:]:
            out += p
        return out

    def allgather(self, rank: int, buf: np.ndarray, group: tuple[int, ...],
                  timeout: float = 60.0) -> np.ndarray:
        return np.stack(self._gather(rank, buf, group, timeout))


class LocalTransport(Transport):
    def __init__(self, hub: LocalHub, rank: int, loss: LinkLoss | None, wire: str, wait: WaitPolicy):
        super().__init__(rank, hub.size, loss, wire, wait)
        self.hub = hub
        self.group = tuple(range(hub.size))        # the collectives' ranks (set_group changes it)

    def _post(self, dest: int, buf, nbytes: int):
        self.hub.inboxes[dest].put((self.rank, buf[:nbytes]))

    def _arrived(self) -> list[Message]:
        inbox, out = self.hub.inboxes[self.rank], []
        while not inbox.empty():
            source, data = inbox.get_nowait()
            out.append(decode(source, data))
        return out

    def _beat(self, dest: int):
        buf = np.empty(64, np.uint8)
        n = write_frame(buf, Kind.BEAT, 0, 0, frame(np.empty((0, 0), np.float32)), 0.0)
        self._post(dest, buf, n)

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        return self.hub.allreduce(self.rank, x, self.group)

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        return self.hub.allgather(self.rank, buf, self.group)

    def close(self) -> int:
        self.stop_beats()
        self.pump(flush=True)
        return 0
