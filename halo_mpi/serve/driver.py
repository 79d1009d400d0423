"""The rank that runs the model serves jobs: one sequence at a time through a session (one
process, tensor mode), turning each token into text for the client, honouring stop strings,
token limits and clients that go away.

    serve_sessions(broker, tok, session_for, stop_ids)   # until broker.closed is set
"""
from __future__ import annotations

import time

import torch

from ..model.generate import Sampler, generate
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
    time.sleep(0)   # (let the server thread deliver the last events)
