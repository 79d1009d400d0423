#!/usr/bin/env python3
"""Run pytest under `mpiexec -n N` with one log per rank, printed in rank order.

    python tests/mpi_run.py 4 [pytest args...]

Per-rank output would interleave on a shared terminal, so each rank writes its own log; this
prints them in order, with each rank's own summary line folded into a per-rank status, then one
pytest summary line for the whole launch. Exit status: non-zero if any rank failed, crashed or
the launch timed out (HALO_MPI_TEST_TIMEOUT seconds, default 1200).
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from halo_mpi.errors import HaloError
from halo_mpi.net.launch import mpiexec_path

# pytest's closing line, with or without its ==== frame (-q drops it): "3 passed, 1 skipped in 2.1s"
SUMMARY = re.compile(r"^=*\s*((?:no tests ran|\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|"
                     r"xpassed|warnings?))(?:, \d+ \w+)* in [\d.]+s(?: \([\d:]+\))?)\s*=*$")


SHM_PATTERN = "/dev/shm/mpich_shm_*"


def files_in_use() -> set[str]:
    """Paths that a live process has open or mapped (another job's shared memory is among them)."""
    used = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                used.update(line.split(None, 5)[-1].strip() for line in f if "/dev/shm/" in line)
            fd_dir = f"/proc/{pid}/fd"
            used.update(os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir))
        except OSError:
            continue
    return used


def remove_own_shm(before: set[str]):
    """A failed launch can leave MPICH's shared-memory files behind: remove those that appeared
    during this launch and that no live process uses, never another job's."""
    in_use = files_in_use()
    for path in set(glob.glob(SHM_PATTERN)) - before - in_use:
        try:
            os.remove(path)
        except OSError:
            pass


def main() -> int:
    n, pytest_args = int(sys.argv[1]), sys.argv[2:]
    try:
        mpiexec = mpiexec_path()
    except HaloError as e:
        print(f"mpi_run: {e}", file=sys.stderr)
        return 2
    logs = tempfile.mkdtemp(prefix=f"halo-mpi-tests-n{n}-")
    # each rank redirects its own output; python -m mpi4py aborts the job if a rank dies
    rank_cmd = ('exec "$0" -m mpi4py -m pytest --with-mpi -p no:cacheprovider "$@" '
                f'> "{logs}/rank.$PMI_RANK.log" 2>&1')
    cmd = [mpiexec, "-n", str(n), "sh", "-c", rank_cmd, sys.executable, *pytest_args]
    timeout = int(os.environ.get("HALO_MPI_TEST_TIMEOUT", "1200"))
    shm_before = set(glob.glob(SHM_PATTERN))
    try:
        code = subprocess.run(cmd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"mpi_run: mpiexec -n {n} did not finish within {timeout} s", file=sys.stderr)
        code = 124
    summaries, failed = [], code != 0
    for rank in range(n):
        path = os.path.join(logs, f"rank.{rank}.log")
        text = open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""
        lines = text.splitlines()
        summary = next((SUMMARY.match(l).group(1) for l in reversed(lines) if SUMMARY.match(l)), None)
        print(f"{'-' * 30} rank {rank} of {n} {'-' * 30}")
        print("\n".join(l for l in lines if not SUMMARY.match(l)))
        rank_failed = summary is None or re.search(r"\b(failed|errors?)\b", summary)
        if summary is None:
            print(f"[rank {rank}] FAILED: no pytest summary, the rank crashed or was killed")
        else:  # the rank's own summary is not repeated: one summary line per launch, below
            print(f"[rank {rank}] {'FAILED' if rank_failed else 'ok'}")
        summaries.append(summary)
        failed = failed or bool(rank_failed)
    launch = next((s for s in summaries if s and re.search(r"\b(failed|errors?)\b", s)), summaries[0])
    print(f"{'=' * 20} {launch or 'no tests ran'} (mpiexec -n {n}) {'=' * 20}")
    if failed:
        remove_own_shm(shm_before)
    shutil.rmtree(logs, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
