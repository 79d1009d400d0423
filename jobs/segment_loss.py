"""One-way delays of HALO's one-segment layer message (1188 bytes) on the testbed at each loss rate
on rank 1's link, loss-free first, against the emulated `tcp` loss model drawn over the same
loss-free delays (README, "Emulated loss vs the kernel"). Root (network namespaces, iptables).

    sudo .venv/bin/python jobs/segment_loss.py [ROUND_TRIPS] [LOSSES]   # default 300 0.3, ~100 s
    sudo .venv/bin/python jobs/segment_loss.py 300 0.05,0.1,0.2,0.3
"""
import sys

from halo_mpi.bench.emulation import emulated_samples
from halo_mpi.testbed.delays import measure_delays, summarize

SIZE = 1188


def one_way(loss: float, count: int) -> list[float]:
    res = measure_delays(None, [SIZE], loss, count, warmup=2, timeout=1500)["sizes"][str(SIZE)]
    return res["forward_ms"] + res["back_ms"]


def main(count: int, losses: list[float]):
    base = one_way(0.0, count)
    row = lambda xs: " / ".join(f"{summarize(xs)[q]:.1f}" for q in ("median", "p95", "p99", "max", "mean"))  # noqa: E731
    for loss in losses:
        real = one_way(loss, count)
        emulated = emulated_samples(base, loss, SIZE, 20000, {})   # the model's defaults
        print(f"{SIZE} B at {loss:g} loss, one-way ms, median / p95 / p99 / max / mean", flush=True)
        print(f"  real ({len(real)}):      {row(real)}")
        print(f"  emulated ({len(emulated)}): {row(emulated)}")
        for t in (1, 100, 300, 1000):
            real_share = sum(x >= t for x in real) / len(real)
            emulated_share = sum(x >= t for x in emulated) / len(emulated)
            print(f"  share >= {t} ms: real {real_share:.3f}, emulated {emulated_share:.3f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300,
         [float(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0.3])
