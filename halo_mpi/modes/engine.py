"""What a command holds once a mode is open: the same calls in every mode, on every rank.

    with open_engine(options, comm, prepare) as engine:     # modes/open.py
        engine.generate(on_finish=print_sequence)           # rank 0 runs the jobs, the rest follow
        report = engine.report()                            # rank 0: lines, statistics, error

Batching is a capability: `max_batch` is how many sequences one step may carry (1: the mode
decodes one at a time). A mode that batches provides `batch_model()` (model/batch.py's calls:
open, step over several sequences, close) and `generate` runs its jobs through the Batcher,
joining and leaving between steps; otherwise each job runs alone through `session`.

An engine runs once: `generate` (jobs from the workload, or from a source such as a server's
queue) or `perplexity` (teacher-forced, over the workload's ids). On rank 0 it does the work; on
every other rank the same call serves rank 0 until rank 0 is done. `prepare(tokenizer, context)`,
run on rank 0 while the mode opens (inside the start-up collective, so a bad prompt is one line
before any weight is read), gives the `Workload`.
"""
from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import HaloError
from ..model.batch import Batcher, BatchModel
from ..model.evaluate import batched_nll, split_text, teacher_forced_nll
from ..model.generate import GenerationResult
from ..model.jobs import Finished, Job, JobList, JobSource, run_job
from ..net.launch import responsive
from ..options.tree import ModeOptions
from ..stats import RunStats

POLL_S = 0.1        # longest wait for a job before checking whether the source is exhausted


@dataclass
class Workload:
    """What rank 0 is asked to do, known at start (a server's jobs come later)."""
    jobs: list[Job] = field(default_factory=list)     # sequences to generate
    score: list[int] | None = None                    # token ids to score (perplexity)


Prepare = Callable[[object, int], Workload]           # (tokenizer, context) -> the workload


@dataclass
class Report:
    """What rank 0 says at the end of a run."""
    lines: list[str]                  # printed on stderr
    stats: RunStats                   # --stats-json
    error: HaloError | None = None    # raised once the lines are out (a rank was lost)


class Engine:
    """A mode open on this rank. Subclasses provide `_run`, `session` and `_report`."""
    mode = ""
    chunk_alone = False                   # a prompt fed in chunks even alone (Batcher)

    def __init__(self, options: ModeOptions, rank: int = 0, size: int = 1):
        self.options, self.rank, self.size = options, rank, size
        self.tokenizer = None             # rank 0's
        self.context = 0                  # the model's context, tokens
        self.workload = Workload()        # rank 0's
        self.jobs: list[Job] = []         # rank 0: the jobs run, in the order they finished
        self.batcher: Batcher | None = None   # rank 0, while generate runs batched

    @property
    def max_batch(self) -> int:
        """Sequences one step may carry: 1 unless the mode batches (then `batch_model`)."""
        return 1

    @property
    def scores_batched(self) -> bool:
        """Whether `batch_model` serves several sequences (generate, perplexity --sequences):
        true where a mode batches through it; pipeline mode batches inside its ring instead."""
        return self.max_batch > 1

    @property
    def leads(self) -> bool:
        return self.rank == 0

    # -- what a mode provides
    def _run(self, work: Callable[[], object]):
        """Rank 0: work() and its result; the other ranks serve it until it is done (None)."""
        raise NotImplementedError

    def session(self, max_len: int):
        """Rank 0, inside work(): a session of one sequence (model/generate.py's calls)."""
        raise NotImplementedError

    def batch_model(self) -> BatchModel:
        """Rank 0, inside work(), when max_batch > 1: the model as a batch of sequences."""
        raise NotImplementedError

    def _report(self) -> Report:
        raise NotImplementedError

    def close(self):
        """Release stores, loaders and transports (every path: the engine is a context manager)."""

    # -- the calls every mode shares
    def generate(self, source: JobSource | None = None,
                 on_finish: Finished | None = None) -> list[Job] | None:
        """Every job of `source` (default: the workload's), each through a session of its own;
        rank 0 returns the jobs as they finished, with their results. With max_batch > 1 the
        jobs run together, up to max_batch per step, joining and leaving between steps."""
        def work():
            jobs = source if source is not None else JobList(self.workload.jobs)
            if self.max_batch > 1:
                return self._run_batched(jobs, on_finish)
            while True:
                job = jobs.take(POLL_S)
                if job is None:
                    if jobs.exhausted():
                        return self.jobs
                    responsive()        # idle, not stuck in MPI: a dead rank is noticed at the next job
                    continue
                self._run_one(job)
                if on_finish is not None:
                    on_finish(job)
        return self._run(work)

    def _run_batched(self, jobs: JobSource, on_finish: Finished | None) -> list[Job]:
        def finished(job: Job):
            self.jobs.append(job)
            if on_finish is not None:
                on_finish(job)
        self.batcher = Batcher(self.batch_model(), self.max_batch, self.options.prefill_chunk,
                               finished, idle=responsive, chunk_alone=self.chunk_alone)
        with torch.inference_mode():
            self.batcher.run(jobs)
        return self.jobs

    def _run_one(self, job: Job):
        if job.cancelled():
            job.result = GenerationResult(len(job.ids), stopped_by="cancelled")
        else:
            session = self.session(job.max_len)
            try:
                with torch.inference_mode():
                    run_job(session, job)
            finally:
                session.close()
        self.jobs.append(job)

    def perplexity(self, ids: list[int] | None = None, sequences: int = 1) -> list[float] | None:
        """Rank 0: the negative log-likelihood of every token of `ids` (default: the workload's)
        after the ones before it, one decode step per token. sequences > 1: ids cut into that
        many parts scored together, a batched decode step for all of them (each part's first
        token is only context)."""
        if sequences > 1 and not self.scores_batched:
            raise HaloError(f"--sequences {sequences}: {self.describe_mode()} scores one sequence at "
                            f"a time (its batches form inside the mode, not through batch_model)")
        if sequences > self.max_batch:
            raise HaloError(f"--sequences {sequences}: this mode decodes {self.max_batch} "
                            f"sequence{'s' if self.max_batch > 1 else ''} per step at most "
                            f"({self.describe_batch()})")

        def work():
            score = ids if ids is not None else self.workload.score
            with torch.inference_mode():
                if sequences > 1:
                    return batched_nll(self.batch_model(), split_text(score, sequences))
                session = self.session(len(score))
                try:
                    return teacher_forced_nll(session, score)
                finally:
                    session.close()
        return self._run(work)

    def call(self, work: Callable[[], object]):
        """Rank 0: work() (it may use `batch_model` or `session`) and its result; the other
        ranks serve it (None). A benchmark's own loop over the mode."""
        def inside():
            with torch.inference_mode():
                return work()
        return self._run(inside)

    def health(self) -> dict:
        """Rank 0, at any time: what a server's /health says of the mode."""
        batcher = self.batcher
        return {"mode": self.describe_mode(), "ranks": self.size, "max_batch": self.max_batch,
                "batching": self.describe_batch(),
                "batch": len(batcher.active) if batcher is not None else None,
                "steps_by_batch": dict(batcher.steps.by_batch) if batcher is not None else {},
                "step_ms_recent": batcher.steps.recent_ms() if batcher is not None else None}

    def describe_mode(self) -> str:
        return "none"

    def add_steps(self, stats: RunStats, lines: list[str]):
        """A batched run's steps into its report: a line, each step's time and batch, and the
        tokens per second of the steps (a sequence's decode times are its steps': summed over
        the sequences they would count each step once per sequence in it)."""
        steps = self.batcher.steps if self.batcher is not None else None
        if steps is None or not steps.ms:
            return
        lines.append(describe_steps(steps))
        stats.step_ms, stats.step_batch = list(steps.ms), list(steps.batch)
        decode_s = sum(ms for ms, n in zip(steps.ms, steps.decoding) if n) / 1e3
        stats.tokens_per_s = len(stats.decode_ms) / decode_s if decode_s else float("nan")

    def describe_batch(self) -> str:
        """What a step carries, for the server's log line and /health."""
        if self.max_batch > 1:
            return f"batches of up to {self.max_batch} sequences per step (continuous batching)"
        return "one sequence per step (this mode does not batch)"

    def report(self) -> Report | None:
        """Rank 0, after the run: the lines to print, the statistics, an error to raise after."""
        return self._report() if self.leads else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def say(line: str):
    """A line on stderr from rank 0 while a mode opens (the plan, the memory budget)."""
    print(line, file=sys.stderr, flush=True)


def describe_steps(steps) -> str:
    """One line on a batched run's steps: how many, their batch, their time."""
    decode = [ms for ms, n in zip(steps.ms, steps.decoding) if n]
    tokens = sum(steps.decoding)
    return (f"{len(steps.ms)} steps of up to {max(steps.batch)} sequences (median "
            f"{statistics.median(steps.batch):g}): median {statistics.median(steps.ms):.1f} ms/step; "
            f"{tokens} tokens decoded in {sum(decode) / 1e3:.2f} s of steps, "
            f"{tokens / max(sum(decode) / 1e3, 1e-9):.1f} tokens/s in total")
