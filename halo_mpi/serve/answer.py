"""The response to one submitted job, streamed (server-sent events) or whole, in OpenAI's shapes.

    answer = Answer(jobs, chat=True, model="smollm2-135m", tok=tok, logprobs=None)   # a job per choice
    return answer.stream()                    # or: await answer.collect(request)

Finish reasons: "stop" and "length" as OpenAI's; a text cut short says so: "shutdown" (the
server went down mid-stream). A job whose sampling failed ends a stream with an error event, a
whole answer with a 500; a job never started because the server went down, with a 503.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .broker import Job
from .fields import BadRequest

if TYPE_CHECKING:
    from ..model.tokenizer import Tokenizer


def usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


def event(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def failure(done: dict) -> BadRequest:
    """A job that ended with an error: 503 if the server went down before it, else 500."""
    status = 503 if done["finish_reason"] == "shutdown" else 500
    return BadRequest(done["error"], status=status, kind="server_error")


def total_usage(dones: list[dict]) -> dict:
    """The usage of a request's choices: the prompt once, every choice's completion tokens."""
    return usage({"prompt_tokens": dones[0]["prompt_tokens"],
                  "completion_tokens": sum(d["completion_tokens"] for d in dones)})


@dataclass
class Answer:
    """Every chunk of a stream carries the same id and time; each choice its index."""
    jobs: list[Job]                # one per choice, sharing one events queue
    chat: bool                     # chat.completion(.chunk) rather than text_completion
    model: str
    tok: Tokenizer
    logprobs: int | None = None    # None: not asked; k: each token's and the k likeliest
    id: str = field(init=False)
    created: int = field(init=False)   # unix seconds
    offsets: dict = field(init=False, default_factory=dict)   # choice -> characters so far
                                                              # (completions' text_offset)

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    @property
    def events(self):
        return self.jobs[0].events        # the choices' shared queue (set when they are queued)

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    # -- log-probabilities, from the sampler's picks: (token, logprob, [(id, logprob), ...])
    def token_info(self, token: int, logprob: float) -> dict:
        return {"token": self.tok.decode([token]), "logprob": logprob,
                "bytes": list(self.tok.token_bytes(token))}

    def logprob_block(self, index: int, picks: list) -> dict | None:
        if self.logprobs is None:
            return None
        if self.chat:
            return {"content": [{**self.token_info(t, lp),
                                 "top_logprobs": [self.token_info(i, v) for i, v in top]}
                                for t, lp, top in picks]}
        tokens = [self.tok.decode([t]) for t, _, _ in picks]
        offsets = []
        for piece in tokens:
            offsets.append(self.offsets.get(index, 0))
            self.offsets[index] = offsets[-1] + len(piece)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in picks],
                "top_logprobs": [{self.tok.decode([i]): v for i, v in top} for _, _, top in picks],
                "text_offset": offsets}

    def choice(self, index: int, text: str | None, picks: list, finish: str | None,
               first: bool = False) -> dict:
        block = self.logprob_block(index, picks)
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": block, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": block, "finish_reason": finish}

    def chunk(self, index: int, text: str | None, picks: list, finish: str | None,
              first: bool = False) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.head(kind), "choices": [self.choice(index, text, picks, finish, first)]}

    def cancel(self):
        for job in self.jobs:
            job.cancelled.set()

    # -- the two ways to answer
    def stream(self) -> StreamingResponse:
        """Chunks as the choices' tokens come, interleaved; the last choice to end carries the
        usage of all; an error in any choice ends the stream (the others are cancelled)."""
        async def events():
            try:
                if self.chat:
                    for index in range(len(self.jobs)):
                        yield event(self.chunk(index, None, [], None, first=True))
                dones: list[dict] = []
                while len(dones) < len(self.jobs):
                    index, what, value = await self.events.get()
                    if what == "text":
                        yield event(self.chunk(index, *value, None))
                        continue
                    if value["error"]:
                        e = failure(value)
                        yield event({"error": {"message": e.message, "type": e.kind, "param": None,
                                               "code": None}})
                        break
                    dones.append(value)
                    last = self.chunk(index, None, value["picks"], value["finish_reason"])
                    yield event({**last, "usage": total_usage(dones)} if len(dones) == len(self.jobs)
                                else last)
                yield event("[DONE]")
            finally:                      # the client went away, or the stream ended
                self.cancel()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def collect(self, request: Request) -> JSONResponse:
        """The whole text of every choice in one response, once all are done; a client that
        leaves first cancels them, as a stream's does."""
        gone = asyncio.create_task(left(request))
        n = len(self.jobs)
        pieces, picks, dones = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        try:
            while None in dones:
                get = asyncio.ensure_future(self.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()          # 499: nginx's "client closed request"; nobody reads it
                    raise BadRequest("the client closed the connection", status=499)
                index, what, value = get.result()
                if what == "text":
                    pieces[index].append(value[0])
                    picks[index] += value[1]
                    continue
                if value["error"]:
                    raise failure(value)
                dones[index] = value
        finally:
            gone.cancel()
            self.cancel()
        choices = [self.whole_choice(i, "".join(pieces[i]), picks[i] + dones[i]["picks"],
                                     dones[i]["finish_reason"]) for i in range(n)]
        kind = "chat.completion" if self.chat else "text_completion"
        return JSONResponse({**self.head(kind), "choices": choices, "usage": total_usage(dones)})

    def whole_choice(self, index: int, text: str, picks: list, finish: str) -> dict:
        block = self.logprob_block(index, picks)
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": block, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": block, "finish_reason": finish}


async def left(request: Request):
    """Returns once the client has disconnected (the body is already read: what comes next on
    the connection is its end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
