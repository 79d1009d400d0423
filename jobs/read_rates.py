"""How fast a store's groups can be read, and whether a reading thread slows compute.

    .venv/bin/python jobs/read_rates.py [weights/smollm2-135m.h5]

Reads every layer's MLP groups with h5py and with pread at their file offsets (GroupReader, on
store/reader.py's pread_into), warm (page cache) and cold (after posix_fadvise DONTNEED), then
times 300 float32 4096x4096 matrix-vector products alone and with a thread reading the groups cold.
GroupReader's `read_mbps` paces reads like a slow device (a Pi's SD card reads ~40 MB/s), and its
`drop_cache` asks the kernel to forget the file's pages (posix_fadvise DONTNEED), so that cold
reads can be measured on a machine whose page cache would otherwise serve everything from memory.
"""
import os
import sys
import threading
import time

import h5py
import numpy as np
import torch

from halo_mpi.errors import HaloError
from halo_mpi.store.hdf5 import Store
from halo_mpi.store.reader import pread_into


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


PATH = sys.argv[1] if len(sys.argv) > 1 else "weights/smollm2-135m.h5"
with Store(PATH) as s:
    LAYERS = range(s.args.n_layers)


def via_h5py():
    with h5py.File(PATH) as f:
        t0, n = time.perf_counter(), 0
        for layer in LAYERS:
            n += f[f"layers/{layer:03d}/mlp_groups"][()].nbytes
        return n, time.perf_counter() - t0


def via_pread():
    readers = [GroupReader(PATH, f"layers/{layer:03d}/mlp_groups") for layer in LAYERS]
    t0, n = time.perf_counter(), 0
    for r in readers:
        n += r.read(0, r.shape[0]).nbytes
    took = time.perf_counter() - t0
    for r in readers:
        r.close()
    return n, took


def drop_cache():
    fd = os.open(PATH, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def compute(w, x, k=300):
    t0 = time.perf_counter()
    for _ in range(k):
        x @ w
    return time.perf_counter() - t0


if __name__ == "__main__":
    for name, read in (("h5py", via_h5py), ("pread", via_pread)):
        read()
        n, warm = read()
        drop_cache()
        n, cold = read()
        print(f"{name:5s}: {n / 1e6:.0f} MB, warm {n / warm / 1e9:.2f} GB/s, cold {n / cold / 1e9:.2f} GB/s")
    w, x = torch.randn(4096, 4096), torch.randn(1, 4096)
    alone = compute(w, x)
    for name, read in (("pread", via_pread), ("h5py", via_h5py)):
        drop_cache()
        thread = threading.Thread(target=read)
        thread.start()
        together = compute(w, x)
        thread.join()
        print(f"300 matvecs: {alone:.3f} s alone, {together:.3f} s with a {name} thread reading cold")
