"""The reader process of a WeightCache (cache.py): on request, reads a part of the scratch file
into the shared load buffers, in an interpreter of its own, so that the reads never hold the
computing process's GIL (a reader thread there slowed a 10 ms q4 decode step by 5-8 ms: every one
of its wake-ups waited for the compute to let go of the GIL, measured in the budget issue's note).

Started by ProcessReader (scratch.py) as `python -c "from halo_mpi.loading.readproc import main; main()"
SCRATCH_FD SHM_FD SHM_BYTES READ_MBPS COLD` with both descriptors inherited (COLD 1: it reopens
the scratch file with O_DIRECT). Its stdin carries
requests, its stdout replies, as fixed binary records; end of stdin ends it. Only the standard
library is imported (a few MB of memory).
"""
from __future__ import annotations

import mmap
import os
import struct
import sys
import time

REQUEST = struct.Struct("<qqqq")     # position, offset in the shared buffers, offset in the file, bytes
REPLY = struct.Struct("<qd")         # position (-1: failed, a message follows), seconds the read took


def read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def serve(scratch_fd: int, buffers: memoryview, read_mbps: float):
    while True:
        record = read_exactly(0, REQUEST.size)
        if not record:
            return
        position, at, offset, n = REQUEST.unpack(record)
        t0 = time.perf_counter()
        got = 0
        while got < n:
            k = os.preadv(scratch_fd, [buffers[at + got:at + n]], offset + got)
            if k == 0:
                raise OSError(f"the scratch file ends at {offset + got} inside a part")
            got += k
        if read_mbps > 0:
            time.sleep(max(0.0, n / (read_mbps * 1e6) - (time.perf_counter() - t0)))
        os.write(1, REPLY.pack(position, time.perf_counter() - t0))


def main():
    scratch_fd, shm_fd, shm_bytes = (int(x) for x in sys.argv[1:4])
    read_mbps, cold = float(sys.argv[4]), sys.argv[5] == "1"
    shared = mmap.mmap(shm_fd, shm_bytes)
    try:
        if cold:     # past the page cache: the disk's DMA fills the (page-aligned) buffers
            scratch_fd = os.open(f"/proc/self/fd/{scratch_fd}", os.O_RDONLY | os.O_DIRECT)
        serve(scratch_fd, memoryview(shared), read_mbps)
    except (OSError, ValueError) as e:
        message = str(e).encode()
        os.write(1, REPLY.pack(-1, 0.0) + struct.pack("<q", len(message)) + message)
