"""One call opens any mode: the composition root of every command, the bench and the server.

    from halo_mpi.modes.open import open_engine
    with open_engine(options, comm, prepare) as engine:        # options: options/tree.py
        engine.generate()

comm is MPI's world (every rank calls this) or None: one process, where a parallel mode runs its
ranks as threads (`local_ranks` of them: the thread twins the tests use).
"""
from __future__ import annotations

from ..errors import HaloError
from ..net.launch import CollectiveError, threads_per_rank
from ..options.tree import ModeOptions, check
from .engine import Engine, Prepare


def set_threads(threads: int) -> int:
    """torch's thread count for this rank (--threads; 0 = its share of the node's cores)."""
    import torch
    n = threads_per_rank(threads)
    torch.set_num_threads(n)
    return n


def open_engine(options: ModeOptions, comm=None, prepare: Prepare | None = None, log=None,
                local_ranks: int = 1) -> Engine:
    """The engine of options.parallel on this rank (modes/engine.py). `prepare(tokenizer,
    context)` gives rank 0's workload; `log` takes lines rank 0 says during the run (re-plans)."""
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, local_ranks)
    try:
        check(options, size)
    except HaloError as e:               # every rank finds it: rank 0 says it
        raise CollectiveError(str(e), rank) from None
    set_threads(options.threads)
    if options.parallel == "tensor":
        from .tensor import TensorEngine
        return TensorEngine(options, comm, prepare, log, local_ranks)
    if options.parallel == "pipeline":
        from .pipeline import PipelineEngine
        return PipelineEngine(options, comm, prepare, local_ranks)
    from .single import SingleEngine
    return SingleEngine(options, prepare)
