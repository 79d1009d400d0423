"""Between the HTTP server (its own thread, asyncio) and the rank that runs the model (MPI).

A request becomes a `Job` per choice (`n` of them, sharing one events queue, each event tagged
with its choice's index); the server puts them in the `Broker`'s bounded queue together (full:
the client gets 503) and awaits their events; the driver takes jobs, and for each token calls `job.text(...)`,
at the end `job.done(...)`. A client that goes away sets `job.cancelled`, and the driver ends
that job at its next token.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Job:
    ids: list[int]                 # prompt token ids
    max_new: int                   # tokens to generate at most
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)   # strings that end the text (not included)
    sampling: dict = field(default_factory=dict)     # Sampler's other options (fields.Sampling)
    picks: list = field(default_factory=list)        # the sampler's records when logprobs are asked
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None              # (choice, "text", (str, picks)) ..., then
                                                     # (choice, "done", dict); shared by a request's choices
    choice: int = 0                                  # its index among the request's n choices
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[[dict], None] | None = None    # given the end (in the driver's thread): metrics
    queued_at: float = field(default_factory=time.perf_counter)

    def _put(self, event):
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.choice, *event))

    def text(self, piece: str, picks: list):
        """A piece of text, and the sampler's records of the tokens picked since the last piece."""
        self._put(("text", (piece, picks)))

    def done(self, finish_reason: str, completion_tokens: int, error: str | None = None,
             picks: list | None = None, first_token_s: float | None = None, per_token_s: float | None = None):
        """The end: why, how many tokens, an error (None: none), the picks not yet sent, and for
        /metrics the time from the queue to the first token and per token after it."""
        done = {"finish_reason": finish_reason, "completion_tokens": completion_tokens,
                "prompt_tokens": len(self.ids), "error": error, "picks": picks or [],
                "first_token_s": first_token_s, "per_token_s": per_token_s}
        if self.on_done is not None:      # also when no client reads the events any more
            self.on_done(done)
        self._put(("done", done))


class Broker:
    """A bounded queue of jobs, and what /health reports about them."""

    def __init__(self, capacity: int):
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=capacity)
        self.closed = threading.Event()
        self.running = 0                  # jobs being generated now
        self.served = 0

    def submit(self, *jobs: Job) -> bool:
        """All the jobs queued (a request's choices), or none and False when they do not fit.
        Only the server's event loop submits and the driver only takes, so the room seen here
        can only grow before the jobs are put."""
        if self.jobs.maxsize - self.jobs.qsize() < len(jobs):
            return False
        for job in jobs:
            self.jobs.put_nowait(job)
        return True

    def take(self, timeout: float) -> Job | None:
        try:
            return self.jobs.get(timeout=timeout)
        except queue.Empty:
            return None

    def take_nowait(self) -> Job | None:
        return self.take(0.0) if not self.jobs.empty() else None

    @property
    def queued(self) -> int:
        return self.jobs.qsize()

    def drain(self, reason: str = "shutdown"):
        """Every job still queued ends at once (the server is going down)."""
        while (job := self.take_nowait()) is not None:
            job.done(reason, 0, error="the server is shutting down; this request was not started")
