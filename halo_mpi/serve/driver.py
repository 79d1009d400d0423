"""The rank that runs the model serves jobs: one sequence at a time through a session (one
process, tensor mode), turning each token into text for the client, honouring stop strings,
token limits and clients that go away.

    serve_sessions(broker, tok, session_for, stop_ids)   # until broker.closed is set
"""
from __future__ import annotations

import torch

from ..model.generate import Sampler, generate
from ..net.launch import responsive
from .broker import Broker, Job


class TextOut:
    """A job's text as tokens come: pieces go to the client, except a tail that could still
    become a stop string (held back until it cannot)."""

    def __init__(self, job: Job, tok):
        self.job, self.stream = job, tok.streamer()
        self.sent = ""          # text already given to the client
        self.held = ""          # text not sent yet
        self.stopped = False
        self.keep = max((len(s) for s in job.stop), default=1) - 1

    def push(self, token: int) -> bool:
        """True when the text reached a stop string (or the client left): stop generating."""
        if self.job.cancelled.is_set():
            return True
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
            self.job.text(text)

    def close(self):
        if not self.stopped:
            self.held += self.stream.flush()
            self._flush(final=True)


def run_job(job: Job, tok, session_for, stop_ids) -> str:
    """Generate one job through `session_for(max_len)`; returns its finish reason."""
    out = TextOut(job, tok)
    with torch.inference_mode():
        result = generate(session_for(len(job.ids) + job.max_new), job.ids, job.max_new,
                          Sampler(job.temperature, job.top_p, job.seed), stop_ids, on_token=out.push)
    out.close()
    if job.cancelled.is_set():
        reason = "cancelled"
    elif out.stopped or result.stopped_by == "end-of-sequence token":
        reason = "stop"
    else:
        reason = "length"
    job.done(reason, len(result.tokens))
    return reason


def serve_sessions(broker: Broker, tok, session_for, stop_ids, poll_s: float = 0.1):
    """Jobs one at a time until the broker is closed; an error in one job is told to its client
    and ends the server (a rank may have failed: nothing else is safe to run)."""
    while not broker.closed.is_set():
        job = broker.take(poll_s)
        if job is None:
            responsive()        # idle, not stuck in MPI: a dead rank is noticed at the next job
            continue
        if job.cancelled.is_set():
            job.done("cancelled", 0)
            continue
        broker.running += 1
        try:
            run_job(job, tok, session_for, stop_ids)
        except BaseException as e:
            job.done("error", 0, error=str(e) or type(e).__name__)
            raise
        finally:
            broker.running -= 1
            broker.served += 1
    broker.drain()


def serve_ring(broker: Broker, tok, ring, stage, clock, options, poll_s: float = 0.05):
    """Pipeline mode: up to `stage.plan.in_flight` jobs at once on the ring (its recurrent
    pipeline is the natural batch); a job that finishes frees its slot for the next in the
    queue. When the broker closes, the running jobs end at their next token."""
    from ..pipeline.ring import Conductor, Request
    jobs: dict[int, Job] = {}
    outs: dict[int, TextOut] = {}

    def on_token(seq, token: int) -> bool:
        return outs[seq.index].push(token)

    def on_finish(seq):
        job, out = jobs.pop(seq.index), outs.pop(seq.index)
        out.close()
        reason = ("cancelled" if job.cancelled.is_set() else "stop"
                  if out.stopped or seq.result.stopped_by in ("stop", "end-of-sequence token") else "length")
        job.done(reason, len(seq.result.tokens))
        broker.running, broker.served = len(jobs), broker.served + 1

    conductor = Conductor(ring, stage, clock, {}, options, on_finish, on_token)
    index = 0
    while True:
        closing = broker.closed.is_set()
        if closing:
            for job in jobs.values():
                job.cancelled.set()
            if not conductor.active:
                break
        started = False
        while not closing and len(conductor.active) < stage.plan.in_flight:
            job = broker.take_nowait() if conductor.active else broker.take(poll_s)
            if job is None:
                responsive()    # idle, not stuck in MPI (net/launch.py DeathWatch)
                break
            if job.cancelled.is_set():
                job.done("cancelled", 0)
                continue
            conductor.requests[index] = Request(job.ids, job.max_new, (job.temperature, job.top_p, job.seed))
            jobs[index], outs[index] = job, TextOut(job, tok)
            broker.running = len(jobs)
            with torch.inference_mode():
                conductor.start(index)
            index, started = index + 1, True
        if conductor.active:
            for msg in ring.poll(0.0 if started else poll_s):
                conductor.on_return(msg)
    broker.drain()
