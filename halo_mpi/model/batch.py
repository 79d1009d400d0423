"""Continuous batching: many jobs decoded together, one model step for all of them.

    batcher = Batcher(LocalBatch(model), max_batch=8, prefill_chunk=64, on_finish=print)
    batcher.run(JobList(jobs))              # or a server's queue: jobs join and leave as they come

Every step: waiting jobs are admitted up to `max_batch` (a job joins the running batch at the next
step, it never waits for the batch to drain); each running sequence contributes its rows to one
step of the model (one token when it decodes; one prefilling sequence a step feeds its prompt, in
chunks of at most `prefill_chunk` tokens while any other decodes, so a long prompt does not stall
the others for long); each sequence samples from its own logits with its own sampler; finished
ones leave at once and free their caches. Each sequence's result sees its own figures: prefill_s
from its admission to its first token, one decode_s per token (the step it came from).

A `BatchModel` is what a mode provides to run here (the single process: `LocalBatch`):
    state = batch.open(max_len)                   one sequence's state (its KV caches)
    logits = batch.step([(state, ids), ...])      (B, vocab): after each one's last new token
    batch.close(state)                            the state released
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .generate import GenerationResult, Sampler, pick_token
from .jobs import Finished, Job, JobSource
from .llama import Transformer

POLL_S = 0.1        # longest wait for a job when none runs, before checking the source is exhausted


class BatchModel(Protocol):
    def open(self, max_len: int) -> object:
        """A new sequence's state (KV caches for up to max_len tokens)."""

    def step(self, feeds: list[tuple[object, list[int]]]) -> torch.Tensor:
        """One step over the sequences fed (state, new ids): logits (B, vocab) after each one's
        last new token; every state advanced by its ids."""

    def close(self, state: object):
        """The sequence's state released."""


class LocalBatch:
    """The single-process model as a BatchModel (its ragged `step`). pack: keep the float32
    weights reordered for several rows (model/linear.py; twice their memory) from the first step
    that carries two sequences or more, so that a run of one sequence never pays for it."""

    def __init__(self, model: Transformer, pack: bool = True):
        self.model, self.pack = model, pack

    def open(self, max_len: int):
        return self.model.new_cache(max_len)

    def step(self, feeds):
        if self.pack and len(feeds) > 1:
            self.model.pack_for_batches()
            self.pack = False
        return self.model.step(feeds)

    def close(self, state):
        pass                         # the cache goes with its last reference


@dataclass
class Running:
    """A job in the batch."""
    job: Job
    state: object                       # the BatchModel's state of its sequence
    sampler: Sampler
    result: GenerationResult
    admitted_at: float                  # perf_counter when it joined
    fed: int = 0                        # prompt tokens already through the model

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.job.ids)


class StepLog:
    """What the steps did: each one's wall time and sequences (the last LOGGED of them: a server
    runs for days), and how many steps carried each batch size (all of them)."""
    LOGGED = 1 << 16

    def __init__(self):
        self.ms: deque[float] = deque(maxlen=self.LOGGED)
        self.batch: deque[int] = deque(maxlen=self.LOGGED)      # sequences in the step
        self.decoding: deque[int] = deque(maxlen=self.LOGGED)   # of them, those that decoded
        self.by_batch: dict[int, int] = {}                      # batch size -> steps

    def recent_ms(self, steps: int = 32) -> float | None:
        """Median ms of the last `steps` steps (None before one): the model's share of a
        server's time per token, apart from the HTTP side."""
        recent = list(self.ms)[-steps:]
        return round(statistics.median(recent), 2) if recent else None

    def add(self, seconds: float, batch: int, decoding: int):
        self.ms.append(1e3 * seconds)
        self.batch.append(batch)
        self.decoding.append(decoding)
        self.by_batch[batch] = self.by_batch.get(batch, 0) + 1


class Batcher:
    """Runs jobs from a source through a BatchModel, up to max_batch at once (see the module)."""

    def __init__(self, model: BatchModel, max_batch: int, prefill_chunk: int,
                 on_finish: Finished | None = None, idle: Callable[[], None] | None = None,
                 chunk_alone: bool = False):
        """chunk_alone: a prompt is fed in chunks even when no other sequence decodes (a
        distributed step's messages are sized for a chunk's rows)."""
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        self.chunk_alone = chunk_alone
        self.on_finish, self.idle = on_finish, idle
        self.active: list[Running] = []
        self.done: list[Job] = []             # in the order they finished
        self.steps = StepLog()

    def run(self, source: JobSource) -> list[Job]:
        """Every job of the source; returns once none runs and the source is exhausted."""
        while True:
            self.admit(source)
            if self.active:
                self.step()
            elif source.exhausted():
                return self.done
            elif self.idle is not None:
                self.idle()

    def admit(self, source: JobSource):
        """Waiting jobs join, up to max_batch; with none running, waits up to POLL_S for one."""
        while len(self.active) < self.max_batch:
            job = source.take(0.0 if self.active else POLL_S)
            if job is None:
                return
            result = GenerationResult(prompt_tokens=len(job.ids))
            if job.cancelled():
                result.stopped_by = "cancelled"
                self._finish(job, result)
                continue
            self.active.append(Running(job, self.model.open(job.max_len), job.sampler(), result,
                                       time.perf_counter()))

    def feeds(self) -> list[tuple[Running, list[int]]]:
        """This step's rows: a token per decoding sequence, and the prompt of one prefilling
        sequence (the first admitted): whole when no sequence decodes (it stalls nobody; not with
        chunk_alone), else its next chunk of at most prefill_chunk tokens. One prompt a step:
        prefill is compute-bound, so prompts that arrive together reach their first tokens one
        after another (the median waits 2.5 prefills for 4 prompts) rather than all after the
        four (4 prefills)."""
        decoding = any(not run.prefilling for run in self.active)
        feeds, prefilled = [], False
        for run in self.active:
            if not run.prefilling:
                feeds.append((run, run.result.tokens[-1:]))
            elif not prefilled:
                whole = not decoding and not self.chunk_alone
                end = len(run.job.ids) if whole else run.fed + self.prefill_chunk
                feeds.append((run, run.job.ids[run.fed:end]))
                prefilled = True
        return feeds

    def step(self):
        """One model step over the running sequences; each samples, the finished leave."""
        for run in [r for r in self.active if r.job.cancelled()]:
            self._retire(run, "cancelled")
        feeds = self.feeds()
        if not feeds:
            return
        t0 = time.perf_counter()
        logits = self.model.step([(run.state, ids) for run, ids in feeds])     # (B, vocab)
        seconds = time.perf_counter() - t0
        decoding = sum(not run.prefilling for run, _ in feeds)
        self.steps.add(seconds, len(feeds), decoding)
        for (run, ids), row in zip(feeds, logits):
            if run.prefilling:
                run.fed += len(ids)
                if run.prefilling:
                    continue                   # more of its prompt next step: no token yet
                run.result.prefill_s = time.perf_counter() - run.admitted_at
            else:
                run.result.decode_s.append(seconds)
            self._sample(run, row)

    def _sample(self, run: Running, logits: torch.Tensor):
        job, result = run.job, run.result
        verdict = None
        if job.max_new > 0:
            verdict = pick_token(run.sampler, logits, job.stop_ids, job.on_token, result)
        if verdict is None and len(result.tokens) >= job.max_new:
            verdict = "max-new-tokens"
        if verdict is not None:
            self._retire(run, verdict)

    def _retire(self, run: Running, stopped_by: str):
        self.active.remove(run)
        self.model.close(run.state)
        run.result.stopped_by = stopped_by
        self._finish(run.job, run.result)

    def _finish(self, job: Job, result: GenerationResult):
        job.result = result
        self.done.append(job)
        if self.on_finish is not None:
            self.on_finish(job)
