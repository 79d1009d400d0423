"""The MPI world as a launch sees it: ranks, cores, collective startup checks and aborting.

Nothing here binds `COMM_WORLD` at import: `comm` is passed in, so the single-process twin can
stand in. The world size and rank are also read from the launcher's environment, so that
`--help` and argument errors never need MPI initialised.
"""
from __future__ import annotations

import os
import signal
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


def world_comm():
    """MPI's COMM_WORLD, MPI initialised here, and from then on SIGUSR1 from the launcher means a
    peer died (see peer_died; after MPI_Init, which would otherwise own the signal)."""
    from mpi4py import MPI
    if world_size() > 1 and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda signum, frame: peer_died.set())
    return MPI.COMM_WORLD


def collective(comm, fn):
    """Run fn on every rank; if it fails anywhere, every rank raises the same CollectiveError.

    Startup work (opening files, checking options) goes through here, so a bad input anywhere
    ends all ranks with one clear line instead of leaving the healthy ranks waiting forever.
    """
    result, error = None, None
    try:
        result = fn()
    except HaloError as e:
        error = str(e)
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
