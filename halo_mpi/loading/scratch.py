"""The load scratch file of a rank's streamed weights and the readers that fill load buffers from it.

The scratch file holds every streamed part contiguous, page-aligned, so a load is one `os.pread`
(paced with `read_mbps`, past the page cache with `cold`: cache.py says why). The reader does the
reads a WeightCache (cache.py) asks for ahead of the compute: in a process of its own
(`ProcessReader`, readproc.py) or in a thread (`ThreadReader`).
"""
from __future__ import annotations

import mmap
import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from ..errors import HaloError
from ..store.reader import pread_into
from .readproc import REPLY, REQUEST

ALIGN = 64               # bytes: every tensor of a part starts at a multiple (dtype views need it)
PAGE = 4096              # bytes: parts start at a multiple and cold reads cover whole pages (O_DIRECT)


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
