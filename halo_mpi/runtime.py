"""Process-level setup that does not need MPI: the launcher's world size, torch threads."""
from __future__ import annotations

import os

# what MPICH (Hydra), Open MPI and PMIx-based launchers put in each rank's environment
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPIR_CVAR_LOCALNRANKS")


def world_size() -> int:
    """Ranks in this launch, read from the launcher's environment (1 without mpiexec)."""
    for var in _SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def local_ranks() -> int:
    for var in _LOCAL_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return world_size()


def configure_threads(threads: int = 0) -> int:
    """Give each rank its share of this node's cores (more threads than cores thrash)."""
    import torch
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // max(1, local_ranks()))
    torch.set_num_threads(threads)
    return threads
