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
is no reader and `acquire` reads the part itself.

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

import mmap
import os
import queue
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import HaloError
from ..store.reader import pread_into
from .readproc import REPLY, REQUEST

ALIGN = 64               # bytes: every tensor of a part starts at a multiple (dtype views need it)
PAGE = 4096              # bytes: parts start at a multiple and cold reads cover whole pages (O_DIRECT)
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


class ScratchFile:
    """An unnamed file in `directory` (gone when the process ends, however it ends)."""

    def __init__(self, directory: str):
        try:
            self.file = tempfile.TemporaryFile(dir=directory)
        except OSError as e:
            raise HaloError(f"cannot create the load scratch file in {directory}: {e.strerror}; "
                            f"give --load-dir a writable directory") from None
        self.directory, self.fd, self.size = directory, self.file.fileno(), 0
        self.direct_fd = -1

    def pad_to(self, boundary: int):
        """The next append starts at a multiple of `boundary`."""
        self.size = -(-self.size // boundary) * boundary

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
        """Written through, its size whole pages (cold reads read whole pages); with `cold`, out
        of the page cache too."""
        os.ftruncate(self.fd, -(-self.size // PAGE) * PAGE)
        os.fsync(self.fd)
        if cold:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def direct(self) -> int:
        """A descriptor of the same file opened with O_DIRECT (reads past the page cache)."""
        if self.direct_fd < 0:
            try:
                self.direct_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                raise HaloError(f"--cold-reads: {self.directory} cannot be read with O_DIRECT "
                                f"({e.strerror}); give --load-dir on another filesystem") from None
        return self.direct_fd

    def read(self, buf: np.ndarray, offset: int, read_mbps: float | None, cold: bool) -> float:
        """Bytes [offset, offset + len(buf)) into buf, paced and past the page cache on demand
        (then offset and len(buf) are whole pages and buf page-aligned); seconds."""
        t0 = time.perf_counter()
        pread_into(self.direct() if cold else self.fd, buf, offset,
                   f"the load scratch file ends inside the part at {offset}")
        if read_mbps:
            time.sleep(max(0.0, len(buf) / (read_mbps * 1e6) - (time.perf_counter() - t0)))
        return time.perf_counter() - t0

    def close(self):
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1
        self.file.close()


def page_aligned(nbytes: int) -> np.ndarray:
    """A buffer whose address is a multiple of the page size (anonymous memory map)."""
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), np.uint8, nbytes)


# ---------------------------------------------------------------------------------------------
# readers: request(position, slot, nbytes, offset): read bytes [offset, offset + nbytes) of the
# scratch file into the start of buffer `slot`; completed(timeout) -> [(position, seconds)]

class ThreadReader:
    """Reads in a thread of this process (it needs the GIL around each read)."""

    def __init__(self, scratch: ScratchFile, read_mbps, cold: bool, buffers: list[np.ndarray]):
        self.scratch, self.read_mbps, self.cold, self.buffers = scratch, read_mbps, cold, buffers
        self.todo: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="halo-loader", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            job = self.todo.get()
            if job is None:
                return
            position, slot, nbytes, offset = job
            try:
                seconds = self.scratch.read(self.buffers[slot][:nbytes], offset, self.read_mbps, self.cold)
                self.done.put((position, seconds))
            except (OSError, HaloError) as e:
                self.done.put((-1, str(e)))
                return

    def request(self, position: int, slot: int, nbytes: int, offset: int):
        self.todo.put((position, slot, nbytes, offset))

    def completed(self, timeout: float) -> list:
        out = []
        try:
            out.append(self.done.get(timeout=timeout) if timeout > 0 else self.done.get_nowait())
            while True:
                out.append(self.done.get_nowait())
        except queue.Empty:
            pass
        return out

    def close(self):
        self.todo.put(None)
        self.thread.join(timeout=10)


class ProcessReader:
    """Reads in a process of its own (readproc.py) into shared-memory buffers."""

    def __init__(self, scratch: ScratchFile, read_mbps, cold: bool, slots: int, slot_bytes: int):
        total = max(1, slots * slot_bytes)
        self.shm_fd = os.memfd_create("halo-load-buffers")
        os.ftruncate(self.shm_fd, total)
        self.shared = mmap.mmap(self.shm_fd, total)
        self.buffers = [np.frombuffer(self.shared, np.uint8, slot_bytes, k * slot_bytes)
                        for k in range(slots)]
        self.slot_bytes = slot_bytes
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from halo_mpi.loading.readproc import main; main()",
             str(scratch.fd), str(self.shm_fd), str(total), str(read_mbps or 0), "1" if cold else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(scratch.fd, self.shm_fd), bufsize=0)
        self.out = self.proc.stdout.fileno()
        self.pending = b""

    def request(self, position: int, slot: int, nbytes: int, offset: int):
        try:
            self.proc.stdin.write(REQUEST.pack(position, slot * self.slot_bytes, offset, nbytes))
        except BrokenPipeError:
            raise HaloError(f"the weight reader process ended: {self._why()}") from None

    def completed(self, timeout: float) -> list:
        if not select.select([self.out], [], [], max(0.0, timeout))[0]:
            return []
        data = os.read(self.out, 1 << 16)
        if not data:
            raise HaloError(f"the weight reader process ended: {self._why()}")
        self.pending += data
        out = []
        while len(self.pending) >= REPLY.size:
            position, seconds = REPLY.unpack_from(self.pending)
            if position < 0:
                why = self.pending[REPLY.size + 8:].decode(errors="replace")
                raise HaloError(f"the weight reader failed: {why}")
            out.append((position, seconds))
            self.pending = self.pending[REPLY.size:]
        return out

    def _why(self) -> str:
        if self.proc.poll() is None:
            return "it stopped answering"
        err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
        return err[-1] if err else f"exit status {self.proc.returncode}"

    def rss_mb(self) -> float:
        """The reader process's resident memory (its interpreter and the shared buffers)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
        except (OSError, StopIteration):
            return float("nan")

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()
        os.close(self.shm_fd)


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
