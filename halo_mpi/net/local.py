"""The single-process twin of the MPI transport: ranks as threads, queues as links."""
from __future__ import annotations

import queue

from .framing import Message, decode
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

    def close(self) -> int:
        self.pump(flush=True)
        return 0
