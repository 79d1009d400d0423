"""Reading bytes straight from a file at an offset: one `os.pread` per contiguous run.

A store's weight datasets are contiguous (no chunking), so group g of a dataset lies at
`offset + g * group_bytes` in the file. `os.pread` there reads it without h5py, whose global lock
lets one read at a time through per process; pread releases the GIL, so background threads can
load groups while the main thread computes (the parallel loading of HALO's second mechanism
builds on this: loading/scratch.py reads its parts with pread_into). Measured with
jobs/read_rates.py (319 MB of MLP groups, two runs): pread 8.4-8.5 GB/s from the page cache and
1.0-1.2 GB/s cold, h5py 4.1-7.7 and 0.85-0.87; a thread reading cold slowed 300 float32 matvecs
by 5-13%, about the same for both.
"""
from __future__ import annotations

import os

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
