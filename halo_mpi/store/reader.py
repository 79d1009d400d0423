"""Reading groups straight from the store file: one `os.pread` per run of groups.

A store's weight datasets are contiguous (no chunking), so group g of a dataset lies at
`offset + g * group_bytes` in the file. `os.pread` there reads it without h5py, whose global lock
lets one read at a time through per process; pread releases the GIL, so background threads can
load groups while the main thread computes (the parallel loading of HALO's second mechanism
builds on this). Measured with jobs/read_rates.py (319 MB of MLP groups, two runs): pread 8.4-8.5
GB/s from the page cache and 1.0-1.2 GB/s cold, h5py 4.1-7.7 and 0.85-0.87; a thread reading cold
slowed 300 float32 matvecs by 5-13%, about the same for both.
`read_mbps` paces reads like a slow device (a Pi's SD card reads ~40 MB/s), and `drop_cache` asks
the kernel to forget the file's pages (posix_fadvise DONTNEED), so that a benchmark can measure
cold reads on a machine whose page cache would otherwise serve everything from memory.
"""
from __future__ import annotations

import os
import time

import h5py
import numpy as np

from ..errors import HaloError


def pread_into(fd: int, buf, offset: int, short: str):
    """Fill buf (a writable buffer) from byte `offset` of fd: pread may return less than asked
    (signals, large reads), so it loops; a file that ends first raises HaloError(short)."""
    view, got = memoryview(buf).cast("B"), 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise HaloError(short)
        got += k


class GroupReader:
    """Groups (elements along axis 0) of one contiguous dataset of a store, read with pread."""

    def __init__(self, path: str, dataset: str, read_mbps: float | None = None):
        with h5py.File(path, "r") as f:
            if dataset not in f:
                raise HaloError(f"{path}: dataset /{dataset} is missing; reconvert the model")
            ds = f[dataset]
            offset = ds.id.get_offset()
            if offset is None or ds.chunks is not None or ds.compression is not None:
                raise HaloError(f"{path}: /{dataset} is not stored contiguously; reconvert the model")
            self.offset, self.shape, self.dtype = int(offset), ds.shape, ds.dtype
        self.group_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        self.path, self.read_mbps = path, read_mbps
        self.fd = os.open(path, os.O_RDONLY)
        self.bytes_read = 0
        self.read_s = 0.0

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, start: int, stop: int) -> np.ndarray:    # (stop - start, *shape[1:])
        """Groups start..stop-1: one read of (stop - start) * group_bytes bytes."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise HaloError(f"{self.path}: groups {start}..{stop - 1} outside 0..{self.shape[0] - 1}")
        n = (stop - start) * self.group_bytes
        t0 = time.perf_counter()
        buf = bytearray(n)
        pread_into(self.fd, buf, self.offset + start * self.group_bytes,
                   f"{self.path}: the file ends inside a group; it is truncated")
        if self.read_mbps:      # a slow device: the read takes at least n / rate
            time.sleep(max(0.0, n / (self.read_mbps * 1e6) - (time.perf_counter() - t0)))
        self.bytes_read += n
        self.read_s += time.perf_counter() - t0
        return np.frombuffer(buf, dtype=self.dtype).reshape((stop - start,) + self.shape[1:])

    def drop_cache(self):
        """Ask the kernel to drop this file's pages from its cache (cold reads from here on)."""
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
