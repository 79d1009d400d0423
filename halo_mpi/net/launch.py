"""The MPI world as a launch sees it: ranks, cores, collective startup checks and aborting.

Nothing here binds `COMM_WORLD` at import: `comm` is passed in, so the single-process twin can
stand in. The world size and rank are also read from the launcher's environment, so that
`--help` and argument errors never need MPI initialised.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time

from ..errors import HaloError

# what MPICH (Hydra), Open MPI and PMIx-based launchers put in each rank's environment
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPIR_CVAR_LOCALNRANKS")
ABORT_GRACE_S = 0.3        # between a rank's last line and MPI_Abort (see abort)
INTERRUPT_WAIT_S = 1.5     # a worker's wait before it reports Ctrl-C itself (see abort)


def _env_int(names: tuple[str, ...], default: int) -> int:
    for var in names:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return default


def world_size() -> int:
    """Ranks in this launch, read from the launcher's environment (1 without mpiexec)."""
    return _env_int(_SIZE_VARS, 1)


def world_rank() -> int:
    return _env_int(_RANK_VARS, 0)


def local_ranks() -> int:
    return _env_int(_LOCAL_SIZE_VARS, world_size())


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def oversubscribed() -> bool:
    """More ranks on this node than cores: waiting ranks must leave the cores to computing ones."""
    return local_ranks() > cores()


def mpiexec_path() -> str:
    """The mpiexec to launch ranks with: the one beside this Python (the venv's, from the mpich
    wheel), else the first on PATH."""
    import shutil
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    path = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if path is None:
        raise HaloError("mpiexec not found: pip install mpich (it brings mpiexec into the venv)")
    return path


def threads_per_rank(threads: int = 0) -> int:
    """Compute threads for this rank: as asked, or (0) its share of this node's cores, since more
    threads than cores thrash."""
    return threads if threads > 0 else max(1, cores() // max(1, local_ranks()))


class CollectiveError(HaloError):
    """An error every rank knows about; only rank 0 prints it."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


# Set when the launcher reports that a process of the job died. MPICH's hydra, started with
# `mpiexec -disable-auto-cleanup`, keeps the other ranks running and sends each a SIGUSR1, whose
# default action ends a process without a word (measured with MPICH 5.0.2: point-to-point traffic
# among the survivors goes on; MPIR_CVAR_ENABLE_FT=1 fails an assertion in MPI_Init). Caught, it
# lets the transport name the rank that fell silent (net/transport.py) and HALO go on without it.
peer_died = threading.Event()
STUCK_S = 10.0              # after a death, a main loop that long away from the transport is stuck
MPI_WAIT_S = 60.0           # the least time MPI_Init and MPI_Finalize may wait for the other ranks
_responsive = [time.monotonic()]


def responsive():
    """Called by the transport's waits, where a silent peer is noticed: the main loop is not stuck
    inside a blocking MPI call (see DeathWatch)."""
    _responsive[0] = time.monotonic()


class DeathWatch:
    """Ends the job if a peer dies while this rank is inside a blocking MPI call.

    Python runs a signal's handler only once the main thread is back in the interpreter, and a
    collective (startup's allgather, a broadcast) waiting for a dead rank never returns: the job
    would hang. The C-level handler writes the signal to a wakeup pipe at once, so this thread
    learns of the death; if the main loop then stays away from the transport for `stuck_s`, it
    prints one line and calls MPI_Abort."""

    def __init__(self, comm, stuck_s: float = STUCK_S):
        self.comm, self.stuck_s = comm, stuck_s
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self.run, name="halo-deaths", daemon=True).start()

    def run(self):
        while signal.SIGUSR1 not in os.read(self.read_fd, 64):
            pass
        peer_died.set()
        noticed = time.monotonic()
        # rank 0, if alive, ends the job first: one line, not one per rank
        stuck_s = self.stuck_s + (0.0 if self.comm.Get_rank() == 0 else 2.0)
        while True:
            time.sleep(0.5)
            if time.monotonic() - max(noticed, _responsive[0]) > stuck_s:
                break
        line = (f"halo-mpi: error on rank {self.comm.Get_rank()}: a process of the job died (the "
                f"launcher reported it) while this rank was in a collective step (startup, a "
                f"broadcast) that cannot go on without it; ending the job")
        print(line, file=sys.stderr, flush=True)
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(3)


def world_comm(rank_timeout: float = 60.0):
    """MPI's COMM_WORLD, MPI initialised here, and from then on SIGUSR1 from the launcher means a
    peer died (see peer_died and DeathWatch; after MPI_Init, which would otherwise own the signal).
    MPI_Init waits for every rank: one that dies before it would hold the others there for good,
    so a rank whose MPI_Init takes longer than `rank_timeout` ends (see watchdog). Ranks reach
    MPI_Init and MPI_Finalize at different times (a slow import, rank 0's report), so neither is
    cut shorter than MPI_WAIT_S, however small the rank timeout."""
    watching = world_size() > 1 and threading.current_thread() is threading.main_thread()
    limit = max(rank_timeout, MPI_WAIT_S)
    if watching:
        watcher, through = watchdog(limit, "MPI did not start within {:g} s (--rank-timeout, at "
                                    "least 60): a rank died or never reached MPI_Init; ending")
    from mpi4py import MPI
    if watching:
        os.close(through)
        watcher.wait()
        _watchdogs["timeout"] = limit
        signal.signal(signal.SIGUSR1, lambda signum, frame: peer_died.set())
        DeathWatch(MPI.COMM_WORLD)
        # Hydra's proxy also sends SIGUSR1 to a rank whose PMI connection closes as it exits, even
        # after a clean MPI_Finalize (MPICH 5.0.2, -disable-auto-cleanup). Python puts back the
        # default action (end the process) before MPI_Finalize runs, so a clean run would end
        # "terminated with signal 10". Ignored from the exit on: Python leaves an ignored signal so.
        atexit.register(signal.signal, signal.SIGUSR1, signal.SIG_IGN)
    return MPI.COMM_WORLD


# A watchdog of its own process, for the two places where no thread of a rank can act: inside
# MPI_Init (mpi4py holds the GIL there) and MPI_Finalize (run after Python's own shutdown); both
# wait for every rank, and one that died holds the others there for good. Arguments: the rank's
# pid, the timeout, the line to print (rank 0 only). The rank closes the pipe when it is through
# (or by ending): then it leaves without a word; otherwise it prints and ends the rank (SIGTERM).
_WATCHDOG = """import os, select, sys
pid, timeout, line = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([0], [], [], timeout)[0]:
    if line:
        sys.stderr.write(line + "\\n")
        sys.stderr.flush()
    os.kill(pid, 15)
"""
_watchdogs: dict = {}       # the rank timeout once MPI is up; the finalize watchdog


def watchdog(timeout: float, what: str) -> tuple[subprocess.Popen, int]:
    """End this rank if it is not through within `timeout` s; through = close the returned file
    descriptor (a bare one: Python's shutdown, before MPI_Finalize, closes the files it owns).
    Rank 0 prints `what` (formatted with the timeout) as its error line."""
    line = f"halo-mpi: error on rank 0: {what.format(timeout)}" if world_rank() == 0 else ""
    read_end, write_end = os.pipe()
    # hydra signals a rank's whole process group when a peer dies (SIGUSR1, whose default action
    # ends a process): the watchdog inherits it ignored
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()),
                                 str(timeout), line], stdin=read_end)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    os.close(read_end)
    return proc, write_end


def guard_finalize():
    """Before the exit's MPI_Finalize (once MPI is up): a rank that dies as the run ends would hold
    the others in its barrier; after the rank timeout this rank ends instead. The results are out
    by then. Its pipe closes with this process."""
    if "timeout" in _watchdogs and "finalize" not in _watchdogs:
        _watchdogs["finalize"] = watchdog(_watchdogs["timeout"], "MPI_Finalize did not complete "
                                          "within {:g} s (--rank-timeout, at least 60): a rank died "
                                          "as the run ended; the results above are complete; ending")


BARRIER_NAP = 1e-3      # sleep between tests of a gentle barrier, s


def gentle_barrier(comm):
    """A barrier that sleeps while it waits: MPI's own spins a core, slowing ranks still working."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(BARRIER_NAP)


def collective(comm, fn):
    """Run fn on every rank; if it fails anywhere, every rank raises the same CollectiveError.

    Startup work (opening files, checking options, loading weights) goes through here, so a bad
    input anywhere ends all ranks with one clear line instead of leaving the healthy ranks waiting
    forever. Ranks that finish early sleep in a barrier meanwhile, instead of spinning in the
    allgather (which would slow the ranks still loading on shared cores).
    """
    result, error = None, None
    try:
        result = fn()
    except HaloError as e:
        error = str(e)
    gentle_barrier(comm)
    errors = comm.allgather(error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        messages = sorted({e for _, e in failed})
        if len(messages) == 1 and len(failed) == comm.Get_size():
            text = messages[0]
        else:
            text = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise CollectiveError(text, comm.Get_rank())
    return result


def abort_message(error: BaseException, rank: int | None = None) -> tuple[str, int]:
    """The one line printed for an error or Ctrl-C, and the exit code that goes with it."""
    where = f" on rank {rank}" if rank is not None else ""
    if isinstance(error, KeyboardInterrupt):
        return f"halo-mpi: interrupted{where}", 130
    if isinstance(error, HaloError):
        return f"halo-mpi: error{where}: {error}", error.exit_code
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    at = f" ({tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})" if tb else ""
    return f"halo-mpi: error{where}: {type(error).__name__}: {error}{at}", 1


def abort(comm, error: BaseException) -> int:
    """One line on stderr, then end every rank of the job (MPI_Abort) within seconds: an error
    or Ctrl-C on one rank must never leave the others waiting. Returns the exit code, should
    MPI_Abort return while the launcher ends the job."""
    line, code = abort_message(error, comm.Get_rank())
    if isinstance(error, KeyboardInterrupt) and comm.Get_rank() != 0:
        # Ctrl-C on mpiexec reaches every rank: rank 0's line and MPI_Abort come first and end
        # this rank during the wait, so the user reads one line; a rank interrupted alone prints.
        time.sleep(INTERRUPT_WAIT_S)
    print(line, file=sys.stderr, flush=True)
    # Hydra's proxy forwards a rank's stderr and acts on its abort in one event loop; abort at once
    # and the line can be lost (CI once ended a run non-zero with no line; the likely cause,
    # not reproduced in 16 runs since). A moment lets the line through first.
    time.sleep(ABORT_GRACE_S)
    comm.Abort(code)
    return code
