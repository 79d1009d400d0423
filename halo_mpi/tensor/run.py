"""One rank of a tensor-parallel run under MPI: its transport and part built, run once, closed.

    mpiexec -n 4 halo-mpi generate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05 ...

Every rank opens the store itself (or its own shard: `--weights 'shards/m.rank{rank}.h5'`) and
computes the same plan (tensor/plan.py); `TensorRank` then builds this rank's part
(tensor/assemble.py). Rank 0 runs whatever `drive(coordinator, model)` asks (a generation loop, a
perplexity, a server's requests) and then stops the workers; the others serve partial sums until
then. The mode layer (halo_mpi/modes/tensor.py) drives this; tensor/local.py is its thread twin.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import HaloError
from ..net.transport import MPITransport
from ..stats import cpu_seconds, peak_rss_mb
from ..store.hdf5 import Store
from .assemble import make_coordinator, make_worker
from .coordinator import Coordinator
from .placement import held_by
from .plan import TensorPlan, emulated_loss, max_message_bytes, wait_policy


@dataclass
class TensorRun:
    """What rank 0 knows once the run is over (the workers' fields are empty elsewhere)."""
    coordinator: Coordinator | None
    workers: dict             # rank -> the worker's statistics (rank 0 only)
    pending: list[int]        # requests left pending after closing, per rank (rank 0 only)
    rss_mb: list[float]
    cpu_s: list[float]
    wall_s: float


class RankLost(HaloError):
    """The run finished without a rank (frozen or gone): it cannot be finalized."""
    exit_code = 3       # as RankSilent: the run lost a rank


class TensorRank:
    """This rank's transport and part of the run (rank 0: the coordinator and its model)."""

    def __init__(self, comm, store: Store, plan: TensorPlan, log=None):
        self.comm, self.store, self.plan = comm, store, plan
        self.rank = comm.Get_rank()
        o = plan.options
        self.transport = MPITransport(comm, max_message_bytes(store, o.prefill_chunk), emulated_loss(plan),
                                      peers=range(plan.size) if plan.exchange else None,  # all pairs
                                      wire=plan.wire, wait=wait_policy(plan))
        watch_ranks(self.transport, plan)
        self.coordinator = self.model = self.worker = None
        if self.rank == 0:
            self.coordinator, self.model = make_coordinator(store, plan, self.transport, log)
        else:
            self.worker = make_worker(store, plan, self.transport)

    def run(self, drive) -> tuple[object, TensorRun]:
        """Rank 0: drive(coordinator, model), then STOP to the workers; a worker serves until its
        STOP. Ends with the transport closed and every rank's figures gathered on rank 0:
        (drive's result, the run)."""
        t0 = time.perf_counter()
        result, workers = None, {}
        if self.rank == 0:      # (an error ends the job: net.launch.abort; no STOP then)
            result = drive(self.coordinator, self.model)
            workers = self.coordinator.finish()
        else:
            self.worker.run()
        wall = time.perf_counter() - t0
        return result, self._gather(workers, self.transport.close(), wall)

    def _gather(self, workers: dict, pending: int, wall: float) -> TensorRun:
        size, c = self.plan.size, self.coordinator
        if self.rank == 0 and c.silent:     # a collective would wait for them forever: rank 0
            nan = float("nan")              # reports its own figures and ends the job
            return TensorRun(c, workers, [pending] + [0] * (size - 1), [peak_rss_mb()] + [nan] * (size - 1),
                             [cpu_seconds()] + [nan] * (size - 1), wall)
        gathered = self.comm.gather((pending, peak_rss_mb(), cpu_seconds()), root=0)
        if self.rank != 0:
            return TensorRun(None, {}, [], [], [], wall)
        pend, rss, cpu = (list(x) for x in zip(*gathered))
        return TensorRun(c, workers, pend, rss, cpu, wall)


def watch_ranks(transport, plan: TensorPlan):
    """Heartbeats and the ranks whose silence ends the run (net/transport.py, liveness): every
    worker in strict sync; in HALO sync the holders of attention groups or head rows (their K/V
    caches cannot be rebuilt elsewhere); rank 0 for a worker."""
    if plan.policy.mode == "strict":
        fatal, note = set(range(1, plan.size)), ": strict sync cannot go on without it"
    else:
        fatal = held_by(plan.attention, plan.vocab, plan.size) if plan.attention else set()
        note = (": it holds attention groups with their K/V cache or head rows, which HALO sync "
                "cannot rebuild elsewhere")
    transport.watch(plan.options.rank_timeout, fatal, note)


def lost_ranks(run: TensorRun) -> RankLost | None:
    """Workers that never answered STOP: the error that ends the job after the report."""
    silent = run.coordinator.silent if run.coordinator is not None else []
    if not silent:
        return None
    return RankLost(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} did not "
                    f"answer at the end (frozen or gone): its statistics are missing; ending the job")
