"""Who is named when a rank freezes on a loaded machine: N runs of a 3-rank tensor job
(--rank-timeout 3), rank 2 frozen (SIGSTOP) once rank 0 has started, with `--hogs` CPU hogs
running beside it; prints the rank each run named and the count that named rank 2 only.

    .venv/bin/python jobs/blame_under_load.py --weights weights/smollm2-135m.h5 --sync halo --runs 10
"""
import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_faults import freeze_during_run  # noqa: E402  (the fault tests' launcher)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="the store (HDF5) the job runs")
    p.add_argument("--sync", default="halo", choices=("halo", "strict"), help="tensor sync mode")
    p.add_argument("--runs", type=int, default=10, help="how many runs")
    p.add_argument("--hogs", type=int, default=2, help="CPU hogs (busy loops) beside the runs")
    a = p.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.hogs)]
    right = 0
    try:
        for i in range(a.runs):
            ended = freeze_during_run(
                ["--sync", a.sync, "--weights", a.weights, "--prompt", "hi", "--max-new-tokens", "250",
                 "--ignore-eos", "--quiet", "--rank-timeout", "3"], rank=2, env={})
            named = re.findall(r"error on rank 0: (ranks? [0-9, ]+) silent", ended.err)
            right += named == ["rank 2"]
            print(f"run {i}: named {', '.join(named) or 'nobody'}, ended {ended.took:.1f} s after the "
                  f"freeze, exit {ended.code}", flush=True)
    finally:
        for h in hogs:
            h.kill()
    print(f"named rank 2 only: {right} of {a.runs}")
    return 0 if right == a.runs else 1


if __name__ == "__main__":
    sys.exit(main())
