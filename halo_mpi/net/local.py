"""The single-process twin of the MPI transport: ranks as threads, queues as links."""
from __future__ import annotations

import queue

from .loss import LinkLoss
from .transport import Transport


class LocalHub:
    """N transports connected by in-memory queues, for ranks run as threads of one process."""

    def __init__(self, size: int, loss: LinkLoss | None = None):
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
