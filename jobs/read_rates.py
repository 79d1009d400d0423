"""How fast a store's groups can be read, and whether a reading thread slows compute.

    .venv/bin/python jobs/read_rates.py [weights/smollm2-135m.h5]

Reads every layer's MLP groups with h5py and with store/reader.py's pread, warm (page cache) and
cold (after posix_fadvise DONTNEED), then times 300 float32 4096x4096 matrix-vector products
alone and with a thread reading the groups cold.
"""
import os
import sys
import threading
import time

import h5py
import torch

from halo_mpi.store.hdf5 import Store
from halo_mpi.store.reader import GroupReader

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
