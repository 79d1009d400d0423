"""The load buffers of a rank's streamed weights, refilled in the background while it computes.

Streamed parts (`Part`: one layer's attention or its streamed MLP groups, in the compute layout)
sit in a scratch file, each one contiguous, so loading one is one `os.pread` into a buffer that
the part's tensors then view: no parsing, no packing, no allocation per load. The parts are used
in a fixed cyclic order (layer by layer, token after token), so `slots` buffers form a ring: while
part i computes, the reader fills the buffers of parts i+1 .. i+slots-1; when the compute moves
to part i+1, part i's buffer is asked for part i+slots (budget.py says why this order is best).

The reader is a process of its own by default (`ProcessReader`, readproc.py): the buffers are
shared memory, requests and replies go through pipes, so a read never needs this process's GIL.
A reader thread (`ThreadReader`) is the alternative measured against it; without prefetch there
is no reader and `acquire` reads the part itself. The scratch file and both readers are in
scratch.py; this module is the ring that drives them.

`acquire(part)` is all a user calls: it releases the part held before, passes over any part
skipped (a worker catching up skips whole steps), asks for the parts ahead and blocks until its
part is loaded, timing the wait. With `skippable`, a part is waited for only up to a grace of four
times the median read time plus 5 ms (a storage stall, not a reader a moment behind): then it is
counted late and the caller does without it (HALO sync may drop a non-critical MLP part; never
strict sync).

`read_mbps` paces reads like a slow device (a Pi's SD card reads ~40 MB/s) and `cold` reads with
O_DIRECT, past the page cache, so that every read goes to the disk and the disk's DMA fills the
buffer: on a machine with spare memory the page cache would otherwise serve the scratch file from
memory with a CPU copy (~8 GB/s here), which a device short of memory could not do (O_DIRECT
from this machine's disk: ~0.93 GB/s). Parts start at page boundaries and are read in whole pages
for it.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import HaloError

# PAGE and ScratchFile are imported from here too (parts.py, tests): with Part and WeightCache,
# the interface of the load buffers
from .scratch import PAGE, ProcessReader, ScratchFile, ThreadReader, page_aligned

READERS = ("process", "thread")


@dataclass
class Part:
    """One streamed unit: bytes [offset, offset + nbytes) of the scratch file; `bind(view)` points
    the layers' tensors into a loaded buffer, `bind(None)` lets go of it."""
    name: str
    order: tuple                       # (layer, 0 attention | 1 MLP): the order a token uses parts
    nbytes: int
    offset: int
    bind: Callable[[np.ndarray | None], None]
    index: int = -1                    # position in the cycle, set by WeightCache.start


@dataclass
class CacheStats:
    reads: int = 0
    bytes_read: int = 0
    read_s: float = 0.0                # time inside reads (the reader's, mostly hidden)
    hits: int = 0                      # acquired already loaded
    waits: int = 0                     # acquired after waiting for the read
    blocked_s: float = 0.0             # compute time lost waiting for reads
    late: int = 0                      # skippable parts not waited for (counted missing)
    passed: int = 0                    # parts passed over by a jump ahead (skipped steps)

    def as_dict(self) -> dict:
        acquired = self.hits + self.waits
        return {"reads": self.reads, "bytes_read": self.bytes_read, "read_s": self.read_s,
                "hits": self.hits, "waits": self.waits, "blocked_s": self.blocked_s,
                "late": self.late, "passed": self.passed,
                "hit_rate": self.hits / acquired if acquired else float("nan")}


# ---------------------------------------------------------------------------------------------
# the ring

class WeightCache:
    def __init__(self, scratch: ScratchFile, slots: int, prefetch: bool = True,
                 read_mbps: float | None = None, cold: bool = False, reader: str = "process"):
        if reader not in READERS:
            raise HaloError(f"--loader {reader!r}: choose {' or '.join(READERS)}")
        self.scratch, self.prefetch, self.reader_kind = scratch, prefetch, reader
        self.want_slots = max(1, slots) if prefetch else 1
        self.read_mbps, self.cold = read_mbps, cold
        self.parts: list[Part] = []
        self.stats = CacheStats()
        self.cursor = 0                  # absolute position (cycles * n + index) of the part held or next
        self.held = False                # the part at cursor is acquired
        self.ready: set[int] = set()     # absolute positions loaded and bound
        self.requested = 0               # positions below this were asked of the reader
        self.reader = None
        self.buffers: list[np.ndarray] = []
        self.read_times: list[float] = []    # seconds per read, recent ones (the grace)
        self.views: dict[tuple[int, int, bool], np.ndarray] = {}
        self.reader_rss_mb = 0.0             # the reader process's, measured at close

    def add(self, part: Part):
        self.parts.append(part)

    @property
    def slot_bytes(self) -> int:
        return max((p.nbytes for p in self.parts), default=0)

    @property
    def resident_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def start(self):
        """Fix the cycle (the order a token uses the parts), allocate the buffers, start the reader."""
        self.parts.sort(key=lambda p: p.order)
        for i, p in enumerate(self.parts):
            p.index = i
        if not self.parts:
            return
        # a part may not sit in two buffers at once: no more buffers than parts
        self.slots = min(self.want_slots, len(self.parts))
        size = -(-self.slot_bytes // PAGE) * PAGE
        if self.prefetch and self.reader_kind == "process":
            self.reader = ProcessReader(self.scratch, self.read_mbps, self.cold, self.slots, size)
            self.buffers = self.reader.buffers
        else:
            self.buffers = [page_aligned(size) for _ in range(self.slots)]
            if self.prefetch:
                self.reader = ThreadReader(self.scratch, self.read_mbps, self.cold, self.buffers)

    def acquire(self, part: Part, skippable: bool = False) -> bool:
        """Make `part` usable (module docstring); False: skippable and not loaded, do without it."""
        n = len(self.parts)
        if self.held and self.cursor % n == part.index:
            return True
        if self.held:
            self._drop(self.cursor)
            self.cursor += 1
            self.held = False
        ahead = (part.index - self.cursor) % n       # parts passed over
        for s in range(self.cursor, self.cursor + ahead):
            self._drop(s)
            self.stats.passed += 1
        self.cursor += ahead
        s = self.cursor
        if self.reader is None:                       # no prefetch: read it now
            self.stats.waits += 1
            seconds = self.scratch.read(self._buffer(s), part.offset, self.read_mbps, self.cold)
            self._loaded(s, seconds)
            self.stats.blocked_s += seconds
        else:
            self._ask_ahead()
            self._collect(0.0)
            if s in self.ready:
                self.stats.hits += 1
            else:
                self.stats.waits += 1
                grace = self.grace() if skippable else float("inf")
                t0 = time.perf_counter()
                end = t0 + grace
                while s not in self.ready:
                    left = end - time.perf_counter()
                    if left <= 0:
                        self.stats.blocked_s += time.perf_counter() - t0
                        self.stats.late += 1
                        self.cursor += 1             # its read, when it comes, is thrown away
                        return False
                    self._collect(min(left, 1.0))
                self.stats.blocked_s += time.perf_counter() - t0
        self.held = True
        return True

    def grace(self) -> float:
        """How long a skippable part is waited for: 4 x the median of the recent reads + 5 ms."""
        recent = self.read_times[-64:]
        return 4 * statistics.median(recent) + 5e-3 if recent else 1.0

    def read_bytes(self, part: Part) -> int:
        """What a read of part covers: its bytes, rounded up to whole pages for O_DIRECT."""
        return -(-part.nbytes // PAGE) * PAGE if self.cold else part.nbytes

    def _buffer(self, s: int, read: bool = True) -> np.ndarray:
        """Where position s loads, the first bytes of its slot: what a read fills (read) or the
        part's own bytes (for binding; the same object each time, so views of it are kept)."""
        part = self.parts[s % len(self.parts)]
        key = (part.index, s % self.slots, read)
        if key not in self.views:
            self.views[key] = self.buffers[key[1]][:self.read_bytes(part) if read else part.nbytes]
        return self.views[key]

    def _ask_ahead(self):
        """Ask for every position whose slot is free: up to cursor + slots - 1."""
        start = max(self.requested, self.cursor)
        for s in range(start, self.cursor + self.slots):
            part = self.parts[s % len(self.parts)]
            self.reader.request(s, s % self.slots, self.read_bytes(part), part.offset)
        self.requested = max(self.requested, self.cursor + self.slots)

    def _collect(self, timeout: float):
        for position, seconds in self.reader.completed(timeout):
            if position < 0:
                raise HaloError(f"the weight loader stopped: {seconds}")
            if position >= self.cursor:              # else passed over meanwhile: thrown away
                self._loaded(position, seconds)

    def _loaded(self, s: int, seconds: float):
        part = self.parts[s % len(self.parts)]
        part.bind(self._buffer(s, read=False))
        self.ready.add(s)
        self.stats.reads += 1
        self.stats.bytes_read += part.nbytes
        self.stats.read_s += seconds
        self.read_times.append(seconds)
        if len(self.read_times) > 1024:
            del self.read_times[:-64]

    def _drop(self, s: int):
        if s in self.ready:
            self.ready.discard(s)
            self.parts[s % len(self.parts)].bind(None)

    def close(self):
        if self.reader is not None:
            if isinstance(self.reader, ProcessReader):
                self.reader_rss_mb = self.reader.rss_mb()
            self.reader.close()
            self.reader = None
        self.scratch.close()
