"""One rank of a tensor-parallel run under MPI: its transport and part built, run once, closed.

    mpiexec -n 4 halo-mpi generate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05 ...

Every rank opens the store itself (or its own shard: `--weights 'shards/m.rank{rank}.h5'`) and
computes the same plan (tensor/plan.py); `TensorRank` then builds this rank's part
(tensor/assemble.py). Rank 0 runs whatever `drive(lead, model)` asks (a generation loop, a
perplexity, a server's requests) and then stops the workers; the other members follow its steps
and the satellites serve partial sums until then. The mode layer (halo_mpi/modes/tensor.py)
drives this; tensor/local.py is its thread twin.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import HaloError
from ..net.transport import MPITransport
from ..stats import cpu_seconds, peak_rss_mb
from ..store.hdf5 import Store
from .assemble import build, roles_change
from .ending import stop_workers
from .lead import Lead
from .plan import TensorPlan, emulated_loss, max_message_bytes, wait_policy


@dataclass
class TensorRun:
    """What rank 0 knows once the run is over (the workers' fields are empty elsewhere)."""
    lead: Lead | None
    workers: dict             # rank -> the worker's statistics (rank 0 only)
    pending: list[int]        # requests left pending after closing, per rank (rank 0 only)
    rss_mb: list[float]
    cpu_s: list[float]
    wall_s: float


class RankLost(HaloError):
    """The run finished without a rank (frozen or gone): it cannot be finalized."""
    exit_code = 3       # as RankSilent: the run lost a rank


class TensorRank:
    """This rank's transport and part of the run (rank 0: the lead and its model)."""

    def __init__(self, comm, store: Store, plan: TensorPlan, log=None, group=None):
        """group: the members' communicator (members_comm), made while every rank is still
        known to be there; a collective after it would hang on a rank frozen meanwhile."""
        self.comm, self.store, self.plan = comm, store, plan
        self.rank = comm.Get_rank()
        if group is None:
            group = members_comm(comm, self.rank in plan.members)
        self.transport = MPITransport(comm, max_message_bytes(store, plan.options.prefill_chunk,
                                                                     plan.options.max_batch),
                                      emulated_loss(plan), peers=peers(plan, self.rank), wire=plan.wire,
                                      wait=wait_policy(plan), group=group)
        watch_ranks(self.transport, plan)
        self.part, self.model = build(store, plan, self.transport, log)
        self.lead = self.part if self.rank == 0 else None

    def run(self, drive) -> tuple[object, TensorRun]:
        """Rank 0: drive(lead, model), then STOP to the workers; a worker serves until its
        STOP. Ends with the transport closed and every rank's figures gathered on rank 0:
        (drive's result, the run)."""
        t0 = time.perf_counter()
        result, workers = None, {}
        if self.rank == 0:      # (an error ends the job: net.launch.abort; no STOP then)
            result = drive(self.lead, self.model)
            workers = stop_workers(self.lead)
        else:
            self.part.run()
        wall = time.perf_counter() - t0
        return result, self._gather(workers, self.transport.close(), wall)

    def _gather(self, workers: dict, pending: int, wall: float) -> TensorRun:
        size, lead = self.plan.size, self.lead
        if self.rank == 0 and (lead.silent or lead.unanswered):   # a collective would wait for them: rank 0
            nan = float("nan")                 # reports its own figures and ends the job
            rest = [nan] * (size - 1)
            return TensorRun(lead, workers, [pending] + [0] * (size - 1), [peak_rss_mb()] + rest,
                             [cpu_seconds()] + rest, wall)
        gathered = self.comm.gather((pending, peak_rss_mb(), cpu_seconds()), root=0)
        if self.rank != 0:
            return TensorRun(None, {}, [], [], [], wall)
        pend, rss, cpu = (list(x) for x in zip(*gathered))
        return TensorRun(lead, workers, pend, rss, cpu, wall)


def peers(plan: TensorPlan, rank: int) -> list[int]:
    """Whom a rank exchanges messages with: a member with every member (the framed all-reduce),
    rank 0 with the satellites too; a satellite with rank 0; everyone with everyone where roles
    change during the run (assemble.roles_change)."""
    if roles_change(plan):               # any worker may be a member or a satellite later
        return [r for r in range(plan.size) if r != rank]
    if rank not in plan.members:
        return [0]
    return sorted(set(plan.members) | (set(plan.satellites) if rank == 0 else set()))


def members_comm(comm, member: bool):
    """The members' own communicator, for their collectives (a satellite is not in it)."""
    from mpi4py import MPI
    return comm.Split(0 if member else MPI.UNDEFINED, comm.Get_rank())


def watch_ranks(transport, plan: TensorPlan):
    """Heartbeats and the ranks whose silence ends the run (net/liveness.py): every worker in
    strict sync; in HALO sync the members (their K/V caches and head rows cannot be rebuilt
    elsewhere); rank 0 for a worker."""
    if plan.policy.mode == "strict":
        fatal, note = set(range(1, plan.size)), ": strict sync cannot go on without it"
    else:
        fatal = set(plan.members) - {0}
        note = (": it holds attention groups with their K/V cache or head rows, which HALO sync "
                "cannot rebuild elsewhere")
    transport.watch(plan.options.rank_timeout, fatal, note)


def lost_ranks(run: TensorRun) -> RankLost | None:
    """Workers that never answered STOP: the error that ends the job after the report."""
    silent = run.lead.silent if run.lead is not None else []
    if not silent:
        return None
    return RankLost(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} did not "
                    f"answer at the end (frozen or gone): its statistics are missing; ending the job")
