"""Pipeline mode's runs: one rank of the ring under MPI (`RingRank`), and the ring as threads of
one process (`run_local`, tests).

    mpiexec -n 4 halo-mpi generate --parallel pipeline --prompt-file prompts.txt --num-sequences 8

Rank 0 makes the plan and broadcasts it; every rank opens the store itself and reads only its own
layers; rank 0 conducts (pipeline/ring.py). The mode layer (halo_mpi/modes/pipeline.py) drives it.
"""
from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass

from ..loading.parts import describe_loading
from ..model.jobs import Job
from ..net.devices import read_device_profile
from ..net.launch import collective, gentle_barrier
from ..net.local import LocalHub
from ..net.transport import MPITransport
from ..options.tree import ModeOptions
from ..stats import RankStats, RunStats, SequenceStats
from ..store.hdf5 import Store
from .conductor import Sequence, conduct
from .plan import Plan, load_stage_model, make_plan, quantized_bytes, serving_plan
from .ring import Cancelled, Clock, Ring, rank_stats, serve, stop_ring
from .stage import Stage


@dataclass
class PipelineRun:
    """What rank 0 knows at the end of a run."""
    plan: Plan
    sequences: list[Sequence]       # in job order
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
        config = {"num_sequences": self.plan.in_flight, "max_batch": self.plan.max_batch,
                  "split": [[r.start, r.stop] for r in self.plan.split]}
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
        lines += [rank_line(r) for r in self.ranks]
        for r in self.ranks:
            if r.get("loading"):
                lines.append(f"rank {r['rank']} memory: {r['loading']['plan']}\n  "
                             f"{describe_loading(r['loading'], self.tokens)}")
        lines.append(f"requests pending at the end: {self.pending_requests}")
        return lines


def rank_line(r: dict) -> str:
    a, b = r["layers"]
    ends = " + embedding, head" if r["embedding_and_head"] else ""
    packed = r.get("packed_bytes", 0)
    packed = f" +{packed / 1e6:.0f} MB reordered for batched steps" if packed else ""
    return (f"rank {r['rank']}: layers {a}-{b - 1} ({b - a}){ends}, {r['parameters'] / 1e6:.1f} M "
            f"parameters ({r['weight_bytes'] / 1e6:.0f} MB{packed}) | {describe_steps(r)} | busy "
            f"{100 * r['busy_share']:.0f}% "
            f"(compute {r['compute_s']:.2f} s, wait {r['wait_s']:.2f} s) | peak RSS "
            f"{r['peak_rss_mb']:.0f} MB (now {r['rss_mb']:.0f} MB)")


def describe_steps(r: dict) -> str:
    """A rank's steps: how many carried each number of sequences, and the median step."""
    by_batch = {int(b): n for b, n in r.get("steps_by_batch", {}).items()}
    if not by_batch:
        return "no steps"
    counts = ", ".join(f"{n} x {b}" for b, n in sorted(by_batch.items()))
    return (f"{sum(by_batch.values())} steps (steps x sequences: {counts}; up to {r['max_batch']}), "
            f"median {r['step_ms_median']:.1f} ms")


# ---------------------------------------------------------------------------------------------
# under MPI

def ring_peers(rank: int, size: int) -> list[int]:
    """Whom a rank receives from: rank 0 from everyone (activations from the last, DONE and
    heartbeats from all); the others from their predecessor, and rank 0's heartbeats."""
    return list(range(1, size)) if rank == 0 else sorted({rank - 1, 0})


class RingRank:
    """One rank of the ring under MPI: the plan (made on rank 0 from `jobs`, or a server's),
    this rank's stage loaded, its transport; `run(role)` once, then `close()`."""

    def __init__(self, comm, o: ModeOptions, jobs: list[Job] | None = None):
        self.comm, self.options = comm, o
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        rank, size = self.rank, self.size

        def plan_on_rank0() -> Plan:
            devices = read_device_profile(o.device_profile, size).ranks if o.device_profile else None
            with Store(o.weights, verify=o.verify) as store:
                if jobs is None:
                    return serving_plan(store.args, size, o, devices, bytes_per_weight=quantized_bytes(store))
                return make_plan(store.args, jobs, size, o, devices, quantized_bytes(store))

        self.plan = comm.bcast(collective(comm, plan_on_rank0 if rank == 0 else lambda: None), root=0)
        self.store = None
        model, self.loading = collective(comm, self._load)
        self.stage = Stage(model, rank, self.plan, self.loading)
        self.transport = (MPITransport(comm, self.plan.max_bytes, peers=ring_peers(rank, size))
                          if size > 1 else None)
        if self.transport is not None:
            # rank 0 cannot go on without any stage
            self.transport.watch(o.rank_timeout, set(range(1, size)), ": pipeline mode cannot go on "
                                 "without its layers; the sequences written so far are complete")
        self.ring = Ring(self.transport, rank, size)
        gentle_barrier(comm)                    # the clocks start together

    def _load(self):
        store = Store(self.options.weights, verify=self.options.verify)
        try:
            model, loading = load_stage_model(store, self.plan, self.rank, self.options)
        finally:
            if self.options.load.mem_budget is None:
                store.close()
        self.store = store if self.options.load.mem_budget is not None else None
        return model, loading

    def run(self, role):
        """role(ring, stage, clock) on this rank and its result; then the transport is closed and
        rank 0 gets each rank's requests left pending (`pending`). An error skips that: the
        caller ends the job (net.launch.abort), and a collective would wait for it forever."""
        result = role(self.ring, self.stage, Clock())
        left = self.transport.close() if self.transport else 0
        gentle_barrier(self.comm)
        self.pending = self.comm.gather(left, root=0)
        return result

    def close(self):
        """Loading and store released."""
        if self.loading is not None:
            self.loading.close()
        if self.store is not None:
            self.store.close()


# ---------------------------------------------------------------------------------------------
# one rank's run of a fixed list of jobs, the same under MPI and as a thread of the local twin

def run_rank(ring: Ring, stage: Stage, jobs: list[Job] | None, clock: Clock, on_finish=None,
             cancelled=None, keep_logits: bool = False) -> PipelineRun | None:
    """Roles are dispatched here: rank 0 conducts, the others serve. Rank 0 returns the run."""
    stage.prepare_batches()
    if ring.rank != 0:
        serve(ring, stage, clock, cancelled)
        return None
    sequences = conduct(ring, stage, clock, jobs, on_finish, cancelled, keep_logits)
    wall = clock.wall()
    others = stop_ring(ring, cancelled)
    return PipelineRun(stage.plan, sequences, [rank_stats(ring, stage, clock)] + others, wall)


# ---------------------------------------------------------------------------------------------
# the single-process twin: ranks as threads over in-memory queues

class LocalRing:
    """Rank 0's stage in the calling thread, the others' in threads, connected by a LocalHub; the
    plan from `jobs`, or a server's without them."""

    def __init__(self, store, o: ModeOptions, size: int, jobs: list[Job] | None = None, devices=None):
        self.plan = (make_plan(store.args, jobs, size, o, devices) if jobs is not None
                     else serving_plan(store.args, size, o, devices))
        self.stages = []
        for r in range(size):
            model, loading = load_stage_model(store, self.plan, r, o)
            self.stages.append(Stage(model, r, self.plan, loading))
        self.hub, self.cancelled = LocalHub(size), threading.Event()
        self.rings = [Ring(self.hub.transports[r] if size > 1 else None, r, size) for r in range(size)]
        self.clocks = [Clock() for _ in range(size)]
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._serve, args=(r,), name=f"rank-{r}", daemon=True)
                        for r in range(1, size)]
        for t in self.threads:
            t.start()

    def _serve(self, r: int):
        try:
            serve(self.rings[r], self.stages[r], self.clocks[r], self.cancelled)
        except BaseException as e:          # noqa: B036 - handed to the caller by check()
            self.errors.append(e)
            self.cancelled.set()

    def check(self):
        """A rank thread's error, raised in the caller's."""
        real = [e for e in self.errors if not isinstance(e, Cancelled)]
        if real:
            raise real[0]

    def stop(self, timeout: float = 60.0) -> list[dict]:
        """STOP round the ring; every rank's statistics (rank 0's first); loading released, the
        transports closed (`pending`: each rank's requests left pending)."""
        try:
            others = stop_ring(self.rings[0], self.cancelled) if not self.errors else []
        finally:
            self.cancelled.set()
            for t in self.threads:
                t.join(timeout)
            for stage in self.stages:
                if stage.loading is not None:
                    stage.loading.close()
            self.pending = [t.close() for t in self.hub.transports]
        self.check()
        return [rank_stats(self.rings[0], self.stages[0], self.clocks[0])] + others


def run_local(store, jobs: list[Job], o: ModeOptions, size: int, devices=None,
              keep_logits: bool = False) -> PipelineRun:
    """A fixed list of jobs on the thread twin (tests): the run as rank 0 knows it."""
    local = LocalRing(store, o, size, jobs, devices)
    for stage in local.stages:
        stage.prepare_batches()
    try:
        sequences = conduct(local.rings[0], local.stages[0], local.clocks[0], jobs, None, local.cancelled,
                            keep_logits)
        wall = local.clocks[0].wall()
    except BaseException:
        local.cancelled.set()
        local.check()            # a rank thread's error first: it is the cause
        raise
    run = PipelineRun(local.plan, sequences, local.stop(), wall)
    run.set_pending(local.pending)
    return run
