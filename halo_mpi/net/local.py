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
        self._rounds: dict[int, dict[int, np.ndarray]] = {}   # all-reduce round -> rank -> its x
        self._calls = [0] * size                               # all-reduce calls per rank
        self._cv = threading.Condition()

    def allreduce(self, rank: int, x: np.ndarray, timeout: float = 60.0) -> np.ndarray:
        """Every rank's x summed in rank order, once all have called (ranks are threads)."""
        with self._cv:
            n = self._calls[rank]
            self._calls[rank] += 1
            parts = self._rounds.setdefault(n, {})
            parts[rank] = x
            self._cv.notify_all()
            if not self._cv.wait_for(lambda: len(parts) >= self.size, timeout):
                raise HaloError(f"all-reduce {n}: ranks {sorted(set(range(self.size)) - set(parts))} "
                                   f"never came")
            out = parts[0].copy()
            for r in range(1, self.size):
                out += parts[r]
            if min(self._calls) > n:          # every rank has taken this round's sum
                self._rounds.pop(n, None)
            return out


class LocalTransport(Transport):
    def __init__(self, hub: LocalHub, rank: int, loss: LinkLoss | None, wire: str, wait: WaitPolicy):
        super().__init__(rank, hub.size, loss, wire, wait)
        self.hub = hub

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
        return self.hub.allreduce(self.rank, x)

    def close(self) -> int:
        self.stop_beats()
        self.pump(flush=True)
        return 0
