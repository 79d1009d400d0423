"""Pipeline mode's runs: under MPI (one stage per rank) and as threads of one process (tests).

    mpiexec -n 4 halo-mpi generate --parallel pipeline --prompt-file prompts.txt --num-sequences 8

Every rank opens the store itself and reads only its own layers; rank 0 conducts (pipeline/ring.py).
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

from ..loading.parts import LoadOptions, describe_loading
from ..net.devices import Device
from ..net.launch import collective
from ..net.local import LocalHub
from ..net.transport import MPITransport
from ..stats import RankStats, RunStats, SequenceStats
from ..store.hdf5 import Store
from .ring import (
    Cancelled,
    Clock,
    Options,
    Plan,
    Request,
    Ring,
    Sequence,
    Stage,
    conduct,
    load_stage_model,
    make_plan,
    rank_stats,
    serve,
    serving_plan,
    stop_ring,
)

BARRIER_NAP = 1e-3      # sleep between tests of a gentle barrier, s


@dataclass
class PipelineRun:
    """What rank 0 knows at the end of a run."""
    plan: Plan
    sequences: list[Sequence]       # by prompt index
    ranks: list[dict]               # rank_stats of every rank
    wall_s: float                   # first prefill to last token
    pending_requests: int = 0       # over all ranks, after closing their transports

    def set_pending(self, per_rank: list[int]):
        for stats, n in zip(self.ranks, per_rank):
            stats["pending_requests_at_end"] = n
        self.pending_requests = sum(per_rank)

    @property
    def tokens(self) -> int:
        return sum(len(s.result.tokens) for s in self.sequences)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else float("nan")

    @property
    def ms_per_token_median(self) -> float:
        gaps = [d for s in self.sequences for d in s.result.decode_s]
        return 1e3 * statistics.median(gaps) if gaps else float("nan")

    def stats(self) -> RunStats:
        """The run in the schema every mode writes (halo_mpi/stats.py)."""
        common = ("rank", "peak_rss_mb", "cpu_s", "compute_s", "wait_s", "pending_requests_at_end")
        ranks = [RankStats(*(r.get(k, 0) for k in common),
                           {k: v for k, v in r.items() if k not in common + ("weight_bytes",)},
                           r.get("weight_bytes", 0)) for r in self.ranks]
        config = {"num_sequences": self.plan.in_flight, "split": [[r.start, r.stop] for r in self.plan.split]}
        return RunStats("pipeline", self.plan.size, self.plan.dtype,
                        [SequenceStats.of(s.index, s.result) for s in self.sequences], ranks,
                        self.tokens_per_s, self.wall_s, config=config)

    def summary_lines(self) -> list[str]:
        lines = [f"[{s.index}] prompt {s.result.prompt_tokens} tokens; generated {len(s.result.tokens)}, "
                 f"first after {s.result.prefill_s * 1e3:.0f} ms, {s.result.ms_per_token_median:.1f} "
                 f"ms/token (median); stopped by {s.result.stopped_by}" for s in self.sequences]
        lines.append(f"pipeline: {self.plan.size} ranks, {len(self.sequences)} sequences "
                     f"({self.plan.in_flight} in flight): {self.tokens} tokens in {self.wall_s:.2f} s, "
                     f"{self.tokens_per_s:.1f} tokens/s total, {self.ms_per_token_median:.1f} ms "
                     f"between a sequence's tokens (median)")
        for r in self.ranks:
            a, b = r["layers"]
            ends = " + embedding, head" if r["embedding_and_head"] else ""
            lines.append(f"rank {r['rank']}: layers {a}-{b - 1} ({b - a}){ends}"
                         f", {r['parameters'] / 1e6:.1f} M parameters ({r['weight_bytes'] / 1e6:.0f} MB)"
                         f" | busy {100 * r['busy_share']:.0f}% "
                         f"(compute {r['compute_s']:.2f} s, wait {r['wait_s']:.2f} s) | "
                         f"peak RSS {r['peak_rss_mb']:.0f} MB (now {r['rss_mb']:.0f} MB)")
        for r in self.ranks:
            if r.get("loading"):
                lines.append(f"rank {r['rank']} memory: {r['loading']['plan']}\n  "
                             f"{describe_loading(r['loading'], self.tokens)}")
        lines.append(f"requests pending at the end: {self.pending_requests}")
        return lines


# ---------------------------------------------------------------------------------------------
# one rank's run, the same under MPI and as a thread of the local twin

def run_rank(ring: Ring, stage: Stage, requests: list[Request] | None, options: Options,
             on_finish=None, cancelled=None) -> PipelineRun | None:
    """Roles are dispatched here: rank 0 conducts, the others serve. Rank 0 returns the run."""
    clock = Clock()
    if ring.rank != 0:
        serve(ring, stage, clock, cancelled)
        return None
    sequences = conduct(ring, stage, clock, requests, options, on_finish, cancelled)
    wall = clock.wall()
    others = stop_ring(ring, cancelled)
    return PipelineRun(stage.plan, sequences, [rank_stats(ring, stage, clock)] + others, wall)


# ---------------------------------------------------------------------------------------------
# under MPI

def ring_peers(rank: int, size: int) -> list[int]:
    """Whom a rank receives from: rank 0 from everyone (activations from the last, DONE and
    heartbeats from all); the others from their predecessor, and rank 0's heartbeats."""
    return list(range(1, size)) if rank == 0 else sorted({rank - 1, 0})


def gentle_barrier(comm):
    """A barrier that sleeps while it waits: MPI's own spins a core, slowing ranks still loading."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(BARRIER_NAP)


def collectively(comm, fn):
    """fn() on every rank; a HaloError on any rank ends them all with one line (launch.collective).
    Ranks that finish early sleep in a barrier meanwhile, instead of spinning in the allgather."""
    def then_meet():
        try:
            return fn()
        finally:
            gentle_barrier(comm)
    return collective(comm, then_meet)


def run_pipeline(comm, weights: str, requests: list[Request] | None, options: Options,
                 devices: list[Device] | None = None, on_finish=None) -> PipelineRun | None:
    """Every rank calls this; requests and devices are read on rank 0 only. Returns the run on
    rank 0, None elsewhere. Each rank opens the store itself and reads only its own layers. An
    error on any rank propagates; the caller ends the job (net.launch.abort)."""
    def plan(store, size):
        return make_plan(store.args, requests, size, options, devices, quantized_bytes(store))
    run, pending = on_the_ring(comm, weights, plan, lambda ring, stage: run_rank(ring, stage, requests,
                                                                                 options, on_finish),
                               options.rank_timeout, options.load)
    if run is not None:
        run.set_pending(pending)
    return run


def serve_pipeline(comm, weights: str, options: Options, drive, devices: list[Device] | None = None):
    """A server's ring: rank 0 runs drive(ring, stage, clock) (it starts sequences as requests
    come, halo_mpi/serve/driver.py) and then stops the ring; the other ranks serve until then."""
    def plan(store, size):
        return serving_plan(store.args, size, options, devices, bytes_per_weight=quantized_bytes(store))

    def role(ring: Ring, stage: Stage):
        clock = Clock()
        if ring.rank != 0:
            return serve(ring, stage, clock)
        try:
            return drive(ring, stage, clock)
        finally:
            stop_ring(ring)
    return on_the_ring(comm, weights, plan, role, options.rank_timeout, options.load)[0]


def quantized_bytes(store) -> float | None:
    """Bytes per weight of a q8_0/q4 store's matrices (they stay so in memory); None otherwise."""
    if store.store_dtype not in ("q8_0", "q4"):
        return None
    a = store.args
    return store.item_bytes("mlp") / (3 * a.group_size * a.dim)


def on_the_ring(comm, weights: str, plan_for, role, rank_timeout: float = 60.0,
                load_options: LoadOptions | None = None) -> tuple:
    """Plan on rank 0 (plan_for(store, size)), load each rank's stage, run role(ring, stage) on
    every rank; returns (rank 0's result, requests pending per rank) on rank 0."""
    rank, size = comm.Get_rank(), comm.Get_size()
    load_options = load_options or LoadOptions()

    def plan_on_rank0():
        with Store(weights) as store:
            return plan_for(store, size)

    plan = comm.bcast(collectively(comm, plan_on_rank0 if rank == 0 else lambda: None), root=0)

    def load():
        store = Store(weights)
        try:
            model, loading = load_stage_model(store, plan, rank, load_options)
        finally:
            if not load_options.mem_budget:
                store.close()
        return model, loading, store

    model, loading, store = collectively(comm, load)
    stage = Stage(model, rank, plan, loading)
    transport = MPITransport(comm, plan.max_bytes, peers=ring_peers(rank, size)) if size > 1 else None
    if transport is not None:
        # rank 0 cannot go on without any stage
        transport.watch(rank_timeout, set(range(1, size)), ": pipeline mode cannot go on without its "
                        "layers; the sequences written so far are complete")
    gentle_barrier(comm)                    # the clocks start together
    try:
        result = role(Ring(transport, rank, size), stage)
    finally:
        if loading is not None:
            loading.close()
            store.close()
    pending = transport.close() if transport else 0
    gentle_barrier(comm)
    return result, comm.gather(pending, root=0)


# ---------------------------------------------------------------------------------------------
# the single-process twin: ranks as threads over in-memory queues (tests)

def run_local(store, requests: list[Request], options: Options, size: int,
              devices: list[Device] | None = None, timeout: float = 600.0) -> PipelineRun:
    plan = make_plan(store.args, requests, size, options, devices)
    stages = []
    for r in range(size):
        model, loading = load_stage_model(store, plan, r, options.load)
        stages.append(Stage(model, r, plan, loading))
    hub, cancelled = LocalHub(size), threading.Event()
    results: list = [None] * size
    errors: list[BaseException] = []

    def rank_main(r: int):
        try:
            ring = Ring(hub.transports[r] if size > 1 else None, r, size)
            results[r] = run_rank(ring, stages[r], requests if r == 0 else None, options,
                                  cancelled=cancelled)
        except BaseException as e:          # noqa: B036 - handed to the caller below
            errors.append(e)
            cancelled.set()

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"rank-{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        cancelled.set()
        raise RuntimeError(f"the local pipeline did not finish within {timeout} s")
    for stage in stages:
        if stage.loading is not None:
            stage.loading.close()
    real = [e for e in errors if not isinstance(e, Cancelled)]
    if errors:
        raise (real or errors)[0]
    run = results[0]
    run.set_pending([t.close() for t in hub.transports])
    return run

