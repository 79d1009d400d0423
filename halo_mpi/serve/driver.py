"""The server's requests run on whatever engine the mode layer opened (halo_mpi/modes/): the
broker's queue is the engine's job source, and each token becomes text for its client, honouring
stop strings, token limits and clients that go away.

    serve_jobs(engine, broker, tok)       # until broker.closed is set

The engine decides how many jobs run at once (one, or pipeline mode's --num-sequences on its
ring); this module knows no engine.
"""
from __future__ import annotations

import itertools
import time

from ..model import jobs
from .broker import Broker, Job


class TextOut:
    """A job's text as tokens come: pieces go to the client, except a tail that could still
    become a stop string (held back until it cannot)."""

    def __init__(self, job: Job, tok):
        self.job, self.stream = job, tok.streamer()
        self.sent = ""          # text already given to the client
        self.held = ""          # text not sent yet
        self.picks: list = []   # the sampler's records of tokens whose text is not sent yet
        self.seen = 0           # job.picks taken so far
        self.first_at: float | None = None   # perf_counter of the first token
        self.stopped = False
        self.keep = max((len(s) for s in job.stop), default=1) - 1

    def push(self, token: int) -> bool:
        """True when the text reached a stop string (or the client left): stop generating."""
        if self.job.cancelled.is_set():
            return True
        if self.first_at is None:
            self.first_at = time.perf_counter()
        self.picks += self.job.picks[self.seen:]      # empty unless logprobs were asked
        self.seen = len(self.job.picks)
        self.held += self.stream.push(token)
        return self._flush(final=False)

    def _flush(self, final: bool) -> bool:
        text = self.held
        cut = min((i for i in (text.find(s) for s in self.job.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            text, self.held = text[:cut], ""
            self._send(text)
            return True
        n = len(text) if final else max(0, len(text) - self.keep)
        self._send(text[:n])
        self.held = text[n:]
        return False

    def _send(self, text: str):
        if text:
            self.sent += text
            self.job.text(text, self.picks)
            self.picks = []

    def close(self):
        if not self.stopped:
            self.held += self.stream.flush()
            self._flush(final=True)


class BrokerSource:
    """The broker's queue as an engine's job source (model/jobs.py): a request becomes a job
    whose tokens go through its TextOut; no job is taken once the server is closing."""

    def __init__(self, broker: Broker, tok):
        self.broker, self.tok = broker, tok
        self.running: dict[int, tuple[Job, TextOut]] = {}    # engine job index -> request, its text
        self.indices = itertools.count()

    def take(self, timeout: float) -> jobs.Job | None:
        if self.broker.closed.is_set():
            return None
        request = self.broker.take(timeout)
        if request is None:
            return None
        out = TextOut(request, self.tok)
        sampling = {**request.sampling, "picks": request.picks}
        job = jobs.Job(request.ids, request.max_new, request.temperature, request.top_p, request.seed,
                       frozenset(self.tok.stop_ids), on_token=self._on_token(request, out),
                       cancelled=request.cancelled.is_set, index=next(self.indices), sampling=sampling)
        self.running[job.index] = (request, out)
        self.broker.running = len(self.running)
        return job

    def _on_token(self, request: Job, out: TextOut):
        def on_token(token: int) -> bool:
            if self.broker.closed.is_set():    # a closing server ends its streams at their next token
                request.cancelled.set()
            return out.push(token)
        return on_token

    def exhausted(self) -> bool:
        return self.broker.closed.is_set()

    def finished(self, job: jobs.Job):
        request, out = self.running.pop(job.index)
        out.close()
        result = job.result
        reason = self.reason(request, out, result)
        error = result.error if reason == "error" else None
        first = out.first_at - request.queued_at if out.first_at is not None else None
        per_token = sum(result.decode_s) / len(result.decode_s) if result.decode_s else None
        request.done(reason, len(result.tokens), error, out.picks, first, per_token)
        self.broker.running, self.broker.served = len(self.running), self.broker.served + 1

    def reason(self, request: Job, out: TextOut, result) -> str:
        """OpenAI's finish reason ("stop", "length"), or what cut the text short: "shutdown" (the
        server is going down), "cancelled" (the client left), "error" (its sampling failed)."""
        if result.stopped_by == "error":
            return "error"
        if request.cancelled.is_set() or result.stopped_by == "cancelled":
            return "shutdown" if self.broker.closed.is_set() else "cancelled"
        if out.stopped or result.stopped_by in ("stop", "end-of-sequence token"):
            return "stop"
        return "length"

    def fail(self, error: BaseException):
        """An error in the engine: every running request is told (the server then ends: a rank
        may have failed, nothing else is safe to run)."""
        for request, _ in self.running.values():
            request.done("error", 0, error=str(error) or type(error).__name__)
        self.running.clear()


def serve_jobs(engine, broker: Broker, tok):
    """Rank 0: the broker's requests on the engine until the broker is closed; what is still
    queued then ends with a clear error."""
    source = BrokerSource(broker, tok)
    try:
        engine.generate(source, on_finish=source.finished)
    except BaseException as e:
        source.fail(e)
        raise
    finally:
        broker.drain()
