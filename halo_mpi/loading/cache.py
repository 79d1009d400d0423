"""The load buffers of a rank's streamed weights, refilled in the background while it computes.

Streamed parts (`Part`: one layer's attention or its streamed MLP groups, in the compute layout)
sit in a scratch file, each one contiguous, so loading one is one `os.pread` into a buffer that
the part's tensors then view: no parsing, no packing, no allocation per load. The parts are used
in a fixed cyclic order (layer by layer, token after token), so `slots` buffers form a ring: while
part i computes, a reader thread fills the buffers of parts i+1 .. i+slots-1; when the compute
moves to part i+1, part i's buffer is refilled with part i+slots (module docstring of budget.py).

`acquire(part)` is all a user calls: it releases the part held before, skips any part passed over
(a worker catching up skips whole steps), and blocks until the part is loaded, timing the wait.
With `skippable`, a part is waited for only up to a grace of four times the median read time plus
5 ms (a storage stall, not a reader a moment behind: waking the reader thread alone took over 1 ms
at times in tests): then it is counted late and the caller does
without it (HALO sync may drop a non-critical MLP part; never strict sync).
Without prefetch there is one buffer and `acquire` reads the part itself: the baseline the ring
is measured against.

`read_mbps` paces reads like a slow device (a Pi's SD card reads ~40 MB/s) and `cold` drops each
part from the page cache after reading it (posix_fadvise DONTNEED), so that every read goes to the
disk: on a machine with spare memory the page cache would otherwise serve the scratch file from
memory, which a device short of memory could not do.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import HaloError

ALIGN = 64               # bytes: every tensor of a part starts at a multiple (dtype views need it)


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
    read_s: float = 0.0                # time inside reads (the reader thread's, mostly hidden)
    hits: int = 0                      # acquired already loaded
    waits: int = 0                     # acquired after waiting for the read
    blocked_s: float = 0.0             # compute time lost waiting for reads
    late: int = 0                      # skippable parts not waited for (counted missing)
    passed: int = 0                    # parts passed over by a jump ahead (skipped steps)
    blocked: list = field(default_factory=list)   # per wait, seconds

    def as_dict(self) -> dict:
        acquired = self.hits + self.waits
        return {"reads": self.reads, "bytes_read": self.bytes_read, "read_s": self.read_s,
                "hits": self.hits, "waits": self.waits, "blocked_s": self.blocked_s,
                "late": self.late, "passed": self.passed,
                "hit_rate": self.hits / acquired if acquired else float("nan")}


class ScratchFile:
    """An unnamed file in `directory` (gone when the process ends, however it ends)."""

    def __init__(self, directory: str):
        try:
            self.file = tempfile.TemporaryFile(dir=directory)
        except OSError as e:
            raise HaloError(f"cannot create the load scratch file in {directory}: {e.strerror}; "
                            f"give --load-dir a writable directory") from None
        self.directory, self.fd, self.size = directory, self.file.fileno(), 0

    def append(self, arrays: list[np.ndarray]) -> tuple[int, list[int]]:
        """Write arrays (any dtype, contiguous) one after another, each at an ALIGN boundary;
        returns the block's offset and each array's offset within it."""
        start, offsets, at = self.size, [], self.size
        try:
            for a in arrays:
                offsets.append(at - start)
                raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
                view, done = memoryview(raw), 0
                while done < len(raw):
                    done += os.pwrite(self.fd, view[done:], at + done)
                at = -(-(at + len(raw)) // ALIGN) * ALIGN
        except OSError as e:
            raise HaloError(f"cannot write the load scratch file in {self.directory}: {e.strerror}; "
                            f"give --load-dir a disk with room for the streamed weights") from None
        self.size = at
        return start, offsets

    def settle(self, cold: bool):
        """Written through; with `cold`, out of the page cache too."""
        os.fsync(self.fd)
        if cold:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self):
        self.file.close()


class WeightCache:
    def __init__(self, scratch: ScratchFile, slots: int, prefetch: bool = True,
                 read_mbps: float | None = None, cold: bool = False):
        self.scratch, self.prefetch = scratch, prefetch
        self.want_slots = max(1, slots) if prefetch else 1
        self.read_mbps, self.cold = read_mbps, cold
        self.parts: list[Part] = []
        self.stats = CacheStats()
        self.cond = threading.Condition()
        self.cursor = 0                  # absolute position (cycles * n + index) of the part held or next
        self.held = False                # the part at cursor is acquired
        self.ready: set[int] = set()     # absolute positions loaded and bound
        self.reading = -1                # the position being read now
        self.next_read = 0               # the reader's next position
        self.stopped = False
        self.error: BaseException | None = None     # what stopped the reader thread
        self.thread = None
        self.buffers: list[np.ndarray] = []
        self.read_times: list[float] = []    # seconds per read, recent ones (the grace)

    def add(self, part: Part):
        self.parts.append(part)

    @property
    def slot_bytes(self) -> int:
        return max((p.nbytes for p in self.parts), default=0)

    @property
    def resident_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def start(self):
        """Fix the cycle (the order a token uses the parts), allocate the buffers and start reading."""
        self.parts.sort(key=lambda p: p.order)
        for i, p in enumerate(self.parts):
            p.index = i
        if not self.parts:
            return
        # a part may not sit in two buffers at once: no more buffers than parts
        self.slots = min(self.want_slots, len(self.parts))
        self.buffers = [np.empty(self.slot_bytes, np.uint8) for _ in range(self.slots)]
        if self.prefetch:
            self.thread = threading.Thread(target=self._reader, name="halo-loader", daemon=True)
            self.thread.start()

    # -- the computing thread

    def acquire(self, part: Part, skippable: bool = False) -> bool:
        """Make `part` usable (module docstring); False: skippable and not loaded, do without it."""
        n = len(self.parts)
        with self.cond:
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
            self.cond.notify_all()
            s = self.cursor
            if s in self.ready:
                self.stats.hits += 1
            elif not self.prefetch:
                self.stats.waits += 1
                t0 = time.perf_counter()
                self._load(s)
                self.ready.add(s)
                self._account_wait(time.perf_counter() - t0)
            else:
                self.stats.waits += 1
                grace = self.grace() if skippable else float("inf")
                t0 = time.perf_counter()
                end = t0 + grace
                while s not in self.ready:
                    if time.perf_counter() >= end:
                        self._account_wait(time.perf_counter() - t0)
                        self.stats.late += 1
                        self.cursor += 1             # the reader discards it if it is reading it
                        self.cond.notify_all()
                        return False
                    if self.stopped:
                        if isinstance(self.error, HaloError):
                            raise self.error
                        raise HaloError(f"the weight loader stopped while {part.name} was awaited"
                                        f"{f': {self.error}' if self.error else ''}")
                    self.cond.wait(min(1.0, max(0.0, end - time.perf_counter())))
                self._account_wait(time.perf_counter() - t0)
            self.held = True
            return True

    def grace(self) -> float:
        """How long a skippable part is waited for: 4 x the median of the recent reads + 5 ms."""
        recent = self.read_times[-64:]
        return 4 * statistics.median(recent) + 5e-3 if recent else 1.0

    def _account_wait(self, seconds: float):
        self.stats.blocked_s += seconds
        self.stats.blocked.append(seconds)

    def _drop(self, s: int):
        if s in self.ready:
            self.ready.discard(s)
            self.parts[s % len(self.parts)].bind(None)

    # -- the reader thread

    def _reader(self):
        try:
            while True:
                with self.cond:
                    while not self.stopped and self.next_read >= self.cursor + self.slots:
                        self.cond.wait()
                    if self.stopped:
                        return
                    s = self.next_read = max(self.next_read, self.cursor)
                    self.reading = s
                buf = self._read(s)
                with self.cond:
                    self.reading, self.next_read = -1, s + 1
                    if s >= self.cursor:
                        self.parts[s % len(self.parts)].bind(buf)
                        self.ready.add(s)
                    self.cond.notify_all()
        except BaseException as e:           # noqa: BLE001 - a waiting compute must hear of it
            with self.cond:
                self.error, self.stopped = e, True
                self.cond.notify_all()

    def _load(self, s: int):
        self.parts[s % len(self.parts)].bind(self._read(s))

    def _read(self, s: int) -> np.ndarray:
        """Part s's bytes into its buffer (slot s mod slots): one pread, paced and made cold on demand."""
        part = self.parts[s % len(self.parts)]
        buf = self.buffers[s % self.slots][:part.nbytes]
        t0 = time.perf_counter()
        view, got = memoryview(buf), 0
        while got < part.nbytes:
            k = os.preadv(self.scratch.fd, [view[got:]], part.offset + got)
            if k == 0:
                raise HaloError(f"the load scratch file ends inside {part.name}")
            got += k
        if self.cold:
            os.posix_fadvise(self.scratch.fd, part.offset, part.nbytes, os.POSIX_FADV_DONTNEED)
        if self.read_mbps:
            time.sleep(max(0.0, part.nbytes / (self.read_mbps * 1e6) - (time.perf_counter() - t0)))
        self.stats.reads += 1
        self.read_times.append(time.perf_counter() - t0)
        if len(self.read_times) > 1024:
            del self.read_times[:-64]
        self.stats.bytes_read += part.nbytes
        self.stats.read_s += time.perf_counter() - t0
        return buf

    def close(self):
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.scratch.close()
