"""The response to one submitted job, streamed (server-sent events) or whole, in OpenAI's shapes.

    answer = Answer(job, chat=True, model="smollm2-135m", tok=tok, logprobs=None)
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


@dataclass
class Answer:
    """Every chunk of a stream carries the same id and time."""
    job: Job
    chat: bool                     # chat.completion(.chunk) rather than text_completion
    model: str
    tok: Tokenizer
    logprobs: int | None = None    # None: not asked; k: each token's and the k likeliest
    id: str = field(init=False)
    created: int = field(init=False)   # unix seconds
    offset: int = field(init=False, default=0)   # characters of text so far (completions' text_offset)

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    # -- log-probabilities, from the sampler's picks: (token, logprob, [(id, logprob), ...])
    def token_info(self, token: int, logprob: float) -> dict:
        return {"token": self.tok.decode([token]), "logprob": logprob,
                "bytes": list(self.tok.token_bytes(token))}

    def logprob_block(self, picks: list, text: str) -> dict | None:
        if self.logprobs is None:
            return None
        if self.chat:
            return {"content": [{**self.token_info(t, lp),
                                 "top_logprobs": [self.token_info(i, v) for i, v in top]}
                                for t, lp, top in picks]}
        tokens = [self.tok.decode([t]) for t, _, _ in picks]
        offsets = []
        for piece in tokens:
            offsets.append(self.offset)
            self.offset += len(piece)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in picks],
                "top_logprobs": [{self.tok.decode([i]): v for i, v in top} for _, _, top in picks],
                "text_offset": offsets}

    def choice(self, text: str | None, picks: list, finish: str | None, first: bool = False) -> dict:
        block = self.logprob_block(picks, text or "")
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": block, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": block, "finish_reason": finish}

    def chunk(self, text: str | None, picks: list, finish: str | None, first: bool = False) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.head(kind), "choices": [self.choice(text, picks, finish, first)]}

    # -- the two ways to answer
    def stream(self) -> StreamingResponse:
        async def events():
            try:
                if self.chat:
                    yield event(self.chunk(None, [], None, first=True))
                while True:
                    what, value = await self.job.events.get()
                    if what == "text":
                        yield event(self.chunk(*value, None))
                        continue
                    if value["error"]:
                        e = failure(value)
                        yield event({"error": {"message": e.message, "type": e.kind, "param": None,
                                               "code": None}})
                    else:
                        yield event({**self.chunk(None, value["picks"], value["finish_reason"]),
                                     "usage": usage(value)})
                    yield event("[DONE]")
                    return
            finally:                      # the client went away, or the stream ended
                self.job.cancelled.set()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def collect(self, request: Request) -> JSONResponse:
        """The whole text in one response, once the job is done; a client that leaves first
        cancels the job, as a stream's does."""
        gone = asyncio.create_task(left(request))
        pieces, picks = [], []
        try:
            while True:
                get = asyncio.ensure_future(self.job.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()          # 499: nginx's "client closed request"; nobody reads it
                    raise BadRequest("the client closed the connection", status=499)
                what, value = get.result()
                if what != "text":
                    break
                pieces.append(value[0])
                picks += value[1]
        finally:
            gone.cancel()
            self.job.cancelled.set()
        done = value
        if done["error"]:
            raise failure(done)
        text, picks = "".join(pieces), picks + done["picks"]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self.logprob_block(picks, text), "finish_reason": done["finish_reason"]}
        else:
            choice = {"index": 0, "text": text, "logprobs": self.logprob_block(picks, text),
                      "finish_reason": done["finish_reason"]}
        kind = "chat.completion" if self.chat else "text_completion"
        return JSONResponse({**self.head(kind), "choices": [choice], "usage": usage(done)})


async def left(request: Request):
    """Returns once the client has disconnected (the body is already read: what comes next on
    the connection is its end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
