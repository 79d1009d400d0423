"""One-way delays of HALO's one-segment layer message (1188 bytes) on the testbed at 30% loss on
rank 1's link, loss-free first, against the emulated `tcp` loss model drawn over the same
loss-free delays (README, "Emulated loss vs the kernel"). Root (network namespaces, iptables).

    sudo .venv/bin/python jobs/loss30.py [ROUND_TRIPS]      # default 300, ~100 s
"""
import sys

from halo_mpi.bench.emulation import emulated_samples
from halo_mpi.net.loss import LinkLoss
from halo_mpi.testbed.delays import measure_delays, summarize

SIZE, LOSS = 1188, 0.3


def one_way(loss: float, count: int) -> list[float]:
    res = measure_delays(None, [SIZE], loss, count, warmup=2, timeout=1500)["sizes"][str(SIZE)]
    return res["forward_ms"] + res["back_ms"]


def main(count: int):
    base, real = one_way(0.0, count), one_way(LOSS, count)
    defaults = {k: getattr(LinkLoss({}), k) for k in ("stall_per_p", "single_per_p", "double_per_p",
                                                        "fast_per_p", "fast_lo_ms", "fast_hi_ms")}
    emulated = emulated_samples(base, LOSS, SIZE, 20000, defaults)
    row = lambda xs: " / ".join(f"{summarize(xs)[q]:.1f}" for q in ("median", "p95", "p99", "max", "mean"))  # noqa: E731
    print(f"{SIZE} B at {LOSS:g} loss, one-way ms, median / p95 / p99 / max / mean")
    print(f"  real ({len(real)}):      {row(real)}")
    print(f"  emulated ({len(emulated)}): {row(emulated)}")
    for t in (1, 100, 300, 1000):
        real_share = sum(x >= t for x in real) / len(real)
        emulated_share = sum(x >= t for x in emulated) / len(emulated)
        print(f"  share >= {t} ms: real {real_share:.3f}, emulated {emulated_share:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
