"""Pipeline mode (`--parallel pipeline`): the ring under MPI, or its thread twin in one process.

`generate` keeps up to --num-sequences jobs in flight on the ring (a finishing job frees its slot
for the next), and each stage runs the ones waiting at it together, up to --max-batch a step
(pipeline/stage.py): the batching happens inside the ring, so `generate` runs the Conductor, not
the engine's Batcher. A session runs one sequence at a time through the ring (`perplexity`).
"""
from __future__ import annotations

import itertools

from ..model.jobs import Finished, Job, JobList, JobSource
from ..model.tokenizer import Tokenizer
from ..net.launch import collective
from ..options.tree import ModeOptions
from ..pipeline.conductor import Conductor, RingSession
from ..pipeline.ring import rank_stats, serve, stop_ring
from ..pipeline.run import LocalRing, PipelineRun, RingRank
from ..store.hdf5 import Store
from .engine import Engine, Prepare, Report, Workload


def planned_jobs(workload: Workload) -> list[Job] | None:
    """The jobs a ring is planned for (None: a server's, planned for --num-sequences at once)."""
    if workload.jobs:
        return workload.jobs
    if workload.score:
        return [Job(workload.score[:1], len(workload.score) - 1)]
    return None


class PipelineEngine(Engine):
    """comm: MPI's communicator (every rank builds one), or None: `local_ranks` ranks as threads."""
    mode = "pipeline"

    def __init__(self, options: ModeOptions, comm=None, prepare: Prepare | None = None,
                 local_ranks: int = 1):
        rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, local_ranks)
        super().__init__(options, rank, size)
        self.comm, self.stats, self.wall_s, self.conductor = comm, [], 0.0, None
        self.seq_ids = itertools.count(1 << 20)      # sessions' sequence ids, apart from jobs'

        def read_workload() -> Workload:
            with Store(options.weights, verify=options.verify) as store:
                self.tokenizer = Tokenizer.from_store(store)
                self.context = store.args.max_seq_len
                return prepare(self.tokenizer, self.context) if prepare else Workload()

        if comm is not None:
            self.workload = collective(comm, read_workload if rank == 0 else Workload)
            self.part = RingRank(comm, options, planned_jobs(self.workload) if rank == 0 else None)
            self.ring, self.stage = self.part.ring, self.part.stage
        else:
            self.workload = read_workload()
            with Store(options.weights, verify=options.verify) as store:
                self.part = LocalRing(store, options, size, planned_jobs(self.workload))
            self.ring, self.stage = self.part.rings[0], self.part.stages[0]
        self.plan = self.stage.plan

    def describe_mode(self) -> str:
        return f"pipeline ({self.plan.in_flight} in flight)"

    @property
    def max_batch(self) -> int:
        """Sequences one step of rank 0's stage may carry (--max-batch; 1 where a memory budget
        streams the attention). Batching happens inside the ring, so `generate` runs the
        Conductor, not the Batcher."""
        return self.stage.max_batch

    scores_batched = False        # (no batch_model: the ring forms its own batches)

    def describe_batch(self) -> str:
        """What a step carries, for the server's start line and /health."""
        ring = f"up to {self.plan.in_flight} sequences in flight on the ring (--num-sequences)"
        if self.max_batch > 1:
            return (f"each stage runs the sequences waiting at it together, up to {self.max_batch} "
                    f"in one step (rank 0: its head likewise); {ring}")
        why = ("--max-batch 1" if self.options.max_batch == 1 else "one in flight" if self.plan.in_flight == 1
               else "its memory budget streams the attention")
        return f"one sequence per stage per step ({why}); {ring}"

    def health(self) -> dict:
        """Adds each rank's share of the layers (a server's /health and /metrics) and rank 0's
        steps: sequences in its last one, steps per batch size, the recent median ms."""
        n, steps = self.plan.n_layers, self.stage.steps
        conductor = self.conductor
        return {**super().health(), "rank_stats": [{"rank": r, "layer_share": len(layers) / n}
                                                   for r, layers in enumerate(self.plan.split)],
                "batch": steps.batch[-1] if steps.batch else None,
                "in_flight": len(conductor.active) if conductor is not None else 0,
                "steps_by_batch": dict(steps.by_batch), "step_ms_recent": steps.recent_ms()}

    def _run(self, work):
        if self.comm is not None:
            return self.part.run(lambda ring, stage, clock: self._role(work, clock))
        return self._lead(work, self.part.clocks[0], self.part.stop)

    def _role(self, work, clock):
        if self.rank != 0:
            return serve(self.ring, self.stage, clock)
        return self._lead(work, clock, lambda: [rank_stats(self.ring, self.stage, clock)]
                          + stop_ring(self.ring))

    def _lead(self, work, clock, stop):
        self.clock = clock
        try:
            return work()
        finally:
            self.wall_s = clock.wall()
            self.stats = stop()

    def session(self, max_len: int) -> RingSession:
        return RingSession(self.ring, self.stage, self.clock, next(self.seq_ids), max_len)

    def generate(self, source: JobSource | None = None,
                 on_finish: Finished | None = None) -> list[Job] | None:
        """Up to --num-sequences jobs at once on the ring (the plan's in-flight count), each stage
        batching the sequences waiting at it (float32 weights packed for that first, every rank)."""
        for stage in getattr(self.part, "stages", [self.stage]):
            stage.prepare_batches()

        def work():
            jobs = source if source is not None else JobList(self.workload.jobs)
            self.conductor = Conductor(self.ring, self.stage, self.clock, self._finished(on_finish))
            self.conductor.drive(jobs, getattr(self.part, "cancelled", None))
            return self.jobs
        return self._run(work)

    def _finished(self, on_finish: Finished | None) -> Finished:
        def finished(job: Job):
            self.jobs.append(job)
            if on_finish is not None:
                on_finish(job)
        return finished

    def _report(self) -> Report:
        done = self.conductor.done if self.conductor is not None else {}
        jobs = sorted((job for job in self.jobs if job.index in done), key=lambda job: job.index)
        run = PipelineRun(self.plan, [done[job.index] for job in jobs], self.stats, self.wall_s)
        run.set_pending(self.part.pending)
        return Report(run.summary_lines(), run.stats())

    def close(self):
        if self.comm is not None:
            self.part.close()
