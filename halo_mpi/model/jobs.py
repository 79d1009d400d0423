"""What an engine generates: jobs, taken from a source until it is exhausted.

    source = JobList([Job(ids, 32), Job(ids2, 32)])     # generate's prompts
    engine.generate(source, on_finish)                   # or a server's queue of requests

A `Job` is one sequence: its prompt's ids, how many tokens at most, how to sample, which tokens
end it, and what to call for each token (True stops the job there: a stop string, a client gone).
A source hands jobs out one at a time (`take`) and says when no more will come (`exhausted`): a
fixed list when it is empty, a server when it is closing. Engines that run one sequence at a time
(one process, tensor mode) take the next job when one ends (`run_job`); pipeline mode keeps up
to --num-sequences jobs in flight on its ring.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .generate import GenerationResult, Sampler, generate


@dataclass
class Job:
    ids: list[int]                                      # prompt token ids
    max_new: int                                        # tokens to generate at most
    temperature: float = 0.0                            # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset = frozenset()                   # a sampled one ends the job (not kept)
    on_token: Callable[[int], bool] | None = None       # each token; True: stop here
    cancelled: Callable[[], bool] = lambda: False       # checked before the job starts
    index: int = 0                                      # its place among the jobs of a run
    sampling: dict = field(default_factory=dict)        # Sampler's other options (penalties, bias, logprobs)
    result: GenerationResult | None = field(default=None, repr=False)   # set when it ends

    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_p, self.seed, **self.sampling)

    @property
    def max_len(self) -> int:
        """The sequence's length at most: what its KV cache must hold."""
        return len(self.ids) + self.max_new


class JobSource(Protocol):
    def take(self, timeout: float) -> Job | None:
        """The next job, waiting up to `timeout` s; None if none came."""

    def exhausted(self) -> bool:
        """True once no job will come any more."""


class JobList:
    """A fixed list of jobs (generate's prompts), handed out in order."""

    def __init__(self, jobs: list[Job]):
        self.waiting = deque(jobs)

    def take(self, timeout: float) -> Job | None:
        return self.waiting.popleft() if self.waiting else None

    def exhausted(self) -> bool:
        return not self.waiting


Finished = Callable[[Job], None]        # called with each job once its result is set


def run_job(session, job: Job) -> GenerationResult:
    """One job through a session (one process, tensor mode): prefill, then sample token by token."""
    job.result = generate(session, job.ids, job.max_new, job.sampler(), job.stop_ids, job.on_token)
    return job.result
