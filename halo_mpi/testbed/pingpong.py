"""Ping-pong of fixed-size messages between rank 0 and one peer, timed per direction.

    halo-mpi testbed delays --loss 0,0.01,0.03,0.05      # on a 2-rank testbed, what you want
    mpiexec -n 2 python -m halo_mpi.testbed.pingpong --sizes 2336 --count 500 --out delays.json

For each size, rank 0 sends a message stamped with its send time; the peer notes its arrival
delay and answers at once with a message of the same size, stamped too; rank 0 notes the
answer's arrival delay and the round trip. The ranks share one machine, hence one monotonic
clock (network namespaces do not change it), so one-way delays are exact, not halves of round
trips. Waiting is `Test` plus naps that double from 20 us to 0.5 ms, never a busy loop (the
ranks share 2 cores): a delay is measured up to the nap in progress, at most 0.5 ms late.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

STAMP = np.dtype([("sent_at", "<f8"), ("index", "<i8")])   # the first 16 bytes of each message
NAP_MIN, NAP_MAX = 2e-5, 5e-4
TAG = 11


def wait_all(requests, deadline: float, what: str):
    """Test until every request is done, napping in between; an error after the deadline."""
    from mpi4py import MPI
    nap = NAP_MIN
    while not MPI.Request.Testall(requests):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"pingpong: {what} not done after the deadline")
        time.sleep(nap)
        nap = min(2 * nap, NAP_MAX)


def stamp(buf: np.ndarray, index: int):
    buf[: STAMP.itemsize] = np.frombuffer(np.array([(time.perf_counter(), index)], STAMP).tobytes(), np.uint8)


def sent_at(buf: np.ndarray) -> float:
    return float(np.frombuffer(buf[: STAMP.itemsize].tobytes(), STAMP)[0]["sent_at"])


def ping(comm, peer: int, size: int, rounds: int, interval: float, timeout: float):
    """Rank 0: send, wait for the answer; returns (forward delays seen by the peer later, back, rtt)."""
    out, back = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
    back_ms, rtt_ms = [], []
    for i in range(rounds):
        recv = comm.Irecv(back, source=peer, tag=TAG)
        stamp(out, i)
        t0 = sent_at(out)
        send = comm.Isend(out, dest=peer, tag=TAG)
        wait_all([send, recv], time.perf_counter() + timeout, f"round trip {i} of {size} B")
        now = time.perf_counter()
        back_ms.append(1e3 * (now - sent_at(back)))
        rtt_ms.append(1e3 * (now - t0))
        if interval:
            time.sleep(interval)
    return back_ms, rtt_ms


def pong(comm, size: int, rounds: int, timeout: float) -> list[float]:
    """The peer: answer each message at once; returns the arrival delays of rank 0's messages."""
    inbox, out = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
    forward_ms = []
    for i in range(rounds):
        wait_all([comm.Irecv(inbox, source=0, tag=TAG)], time.perf_counter() + timeout,
                 f"message {i} of {size} B")
        forward_ms.append(1e3 * (time.perf_counter() - sent_at(inbox)))
        stamp(out, i)
        wait_all([comm.Isend(out, dest=0, tag=TAG)], time.perf_counter() + timeout,
                 f"answer {i} of {size} B")
    return forward_ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m halo_mpi.testbed.pingpong",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2336", help="comma list of message sizes in bytes (>= 16)")
    p.add_argument("--count", type=int, default=500, help="timed round trips per size")
    p.add_argument("--warmup", type=int, default=20, help="untimed round trips first, per size")
    p.add_argument("--peer", type=int, default=1, help="the rank rank 0 talks to")
    p.add_argument("--interval-ms", type=float, default=0.0, help="pause between round trips")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one round trip may take")
    p.add_argument("--out", help="rank 0 writes the samples here (JSON), else prints a summary")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    if min(sizes) < STAMP.itemsize:
        p.error(f"--sizes: every size must be at least {STAMP.itemsize} bytes")

    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if comm.Get_size() <= a.peer:
        p.error(f"--peer {a.peer} needs at least {a.peer + 1} ranks")
    result = {"count": a.count, "warmup": a.warmup, "peer": a.peer, "interval_ms": a.interval_ms,
              "sizes": {}}
    for size in sizes:
        rounds = a.warmup + a.count
        if rank == 0:
            back, rtt = ping(comm, a.peer, size, rounds, a.interval_ms / 1e3, a.timeout)
            result["sizes"][size] = {"back_ms": back[a.warmup:], "rtt_ms": rtt[a.warmup:]}
        elif rank == a.peer:
            forward = pong(comm, size, rounds, a.timeout)
            result["sizes"][size] = {"forward_ms": forward[a.warmup:]}
    # the peer's forward delays go to rank 0, waited for without spinning
    if rank == a.peer:
        req = comm.isend(result["sizes"], dest=0, tag=TAG + 1)
        wait_all([req], time.perf_counter() + a.timeout, "sending the samples")
    elif rank == 0:
        deadline, nap = time.perf_counter() + a.timeout, NAP_MIN
        while not comm.iprobe(source=a.peer, tag=TAG + 1):
            if time.perf_counter() > deadline:
                raise TimeoutError("pingpong: the peer's samples did not arrive")
            time.sleep(nap)
            nap = min(2 * nap, NAP_MAX)
        forward = comm.recv(source=a.peer, tag=TAG + 1)   # here already: no wait
        for size in sizes:
            result["sizes"][size]["forward_ms"] = forward[size]["forward_ms"]
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f)
        else:
            for size in sizes:
                for key, xs in sorted(result["sizes"][size].items()):
                    q = np.percentile(xs, [50, 95, 99, 100])
                    print(f"{size:6d} B {key:11s} median {q[0]:.3f} p95 {q[1]:.3f} p99 {q[2]:.3f} "
                          f"max {q[3]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
