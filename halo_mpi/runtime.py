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


def rank() -> int:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def local_ranks() -> int:
    for var in _LOCAL_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return world_size()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def oversubscribed() -> bool:
    """More ranks on this node than cores: waiting ranks must leave the cores to computing ones."""
    return local_ranks() > cores()


def configure_threads(threads: int = 0) -> int:
    """Give each rank its share of this node's cores (more threads than cores thrash)."""
    import torch
    if threads <= 0:
        threads = max(1, cores() // max(1, local_ranks()))
    torch.set_num_threads(threads)
    return threads
