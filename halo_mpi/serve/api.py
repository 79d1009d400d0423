"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), served from rank 0.

    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "seed",
                                 "stop", "stream"}
    POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], ...the same}
    GET  /v1/models             the one model this server runs
    GET  /health                ranks, mode, link on-time rates, requests queued and running

Streaming answers are server-sent events, one chunk per piece of text and `data: [DONE]` at the
end. Errors have OpenAI's shape ({"error": {"message", "type", "param", "code"}}): 400 for a bad
field or a prompt that leaves no room in the context, 404 for another model, 500 when generating
failed, 503 when the queue is full or the server is going down.

`Api` checks a request and hands its `Job` to the broker; an `Answer` turns the job's events into
the response, streamed or whole; `make_app` only routes.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .broker import Broker, Job

if TYPE_CHECKING:
    from ..model.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_response(e: BadRequest) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param,
                                   "code": None}}, status_code=e.status)


def number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise BadRequest(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}", name)
    return float(value)


def stops(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > 4 or not all(isinstance(s, str) for s in value):
        raise BadRequest("stop must be a string or a list of at most 4 strings", "stop")
    return [s for s in value if s]


def usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


def finish_reason(done: dict) -> str:
    # OpenAI clients know "stop" and "length"; the driver's others ("cancelled") read as "stop"
    return done["finish_reason"] if done["finish_reason"] in ("stop", "length") else "stop"


def event(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def prompt_of(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (one prompt per request)", "prompt")
    return prompt


def messages_of(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRequest("each message needs a role (system, user or assistant) and a string "
                             "content", "messages")
    return messages


@dataclass
class Answer:
    """The response to one submitted job: every chunk of a stream carries the same id and time."""
    job: Job
    chat: bool                     # chat.completion(.chunk) rather than text_completion
    model: str
    id: str = field(init=False)
    created: int = field(init=False)   # unix seconds

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {**self.head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return {**self.head("text_completion"),
                "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

    def stream(self) -> StreamingResponse:
        async def events():
            try:
                if self.chat:
                    yield event(self.chunk(None, None, first=True))
                while True:
                    what, value = await self.job.events.get()
                    if what == "text":
                        yield event(self.chunk(value, None))
                        continue
                    if value["error"]:
                        yield event({"error": {"message": value["error"], "type": "server_error"}})
                    else:
                        yield event({**self.chunk(None, finish_reason(value)), "usage": usage(value)})
                    yield event("[DONE]")
                    return
            finally:                      # the client went away, or the stream ended
                self.job.cancelled.set()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def collect(self) -> JSONResponse:
        """The whole text in one response, once the job is done."""
        pieces = []
        try:
            while True:
                what, value = await self.job.events.get()
                if what != "text":
                    break
                pieces.append(value)
        finally:
            self.job.cancelled.set()
        done = value
        if done["error"]:
            raise BadRequest(done["error"], status=500, kind="server_error")
        text = "".join(pieces)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish_reason(done)}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason(done), "logprobs": None}
        kind = "chat.completion" if self.chat else "text_completion"
        return JSONResponse({**self.head(kind), "choices": [choice], "usage": usage(done)})


@dataclass
class Api:
    """What a request is checked against, and where its job goes."""
    broker: Broker
    tok: Tokenizer
    model_name: str
    context: int                   # tokens: prompt plus completion
    health: Callable[[], dict]     # what the running mode knows (ranks, links)
    default_max_tokens: int = 128

    async def parse(self, request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        model = body.get("model", self.model_name)
        if model != self.model_name:
            raise BadRequest(f"model {model!r} is not served here; this server runs {self.model_name!r}",
                             "model", status=404, kind="invalid_request_error")
        return body

    def job_of(self, body: dict, text: str) -> Job:
        ids, context = self.tok.encode(text), self.context
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        if len(ids) >= context:
            raise BadRequest(f"the prompt has {len(ids)} tokens; the model's context is {context}",
                             "prompt")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", self.default_max_tokens))
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
        seed = body.get("seed", 0)
        if seed is None:
            seed = 0
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BadRequest(f"seed must be an integer, got {seed!r}", "seed")
        if not isinstance(body.get("stream", False), bool):
            raise BadRequest("stream must be true or false", "stream")
        return Job(ids, min(max_tokens, context - len(ids)), number(body, "temperature", 1.0, 0.0, 2.0),
                   number(body, "top_p", 1.0, 0.0, 1.0), seed, stops(body))

    async def submit(self, job: Job):
        if self.broker.closed.is_set():
            raise BadRequest("the server is shutting down", status=503, kind="server_error")
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        if not self.broker.submit(job):
            raise BadRequest(f"the queue is full ({self.broker.jobs.maxsize} requests waiting); "
                             "retry later", status=503, kind="server_error")

    async def respond(self, body: dict, text: str, chat: bool) -> StreamingResponse | JSONResponse:
        """`text` (the prompt, or the chat rendered) becomes a job; its answer, streamed or whole."""
        job = self.job_of(body, text)
        await self.submit(job)
        answer = Answer(job, chat, self.model_name)
        return answer.stream() if body.get("stream", False) else await answer.collect()

    def status(self) -> dict:
        broker = self.broker
        return {"status": "shutting down" if broker.closed.is_set() else "ok", "model": self.model_name,
                "queued": broker.queued, "running": broker.running, "served": broker.served,
                **self.health()}


def make_app(broker: Broker, tok: Tokenizer, model_name: str, context: int, health: Callable[[], dict],
             default_max_tokens: int = 128) -> FastAPI:
    """The app; `health()` adds what the running mode knows (ranks, links) to /health."""
    api = Api(broker, tok, model_name, context, health, default_max_tokens)
    app = FastAPI(title="halo-mpi", docs_url=None, redoc_url=None)

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, e: BadRequest):
        return error_response(e)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await api.parse(request)
        return await api.respond(body, prompt_of(body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await api.parse(request)
        return await api.respond(body, api.tok.chat_messages(messages_of(body)), chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "halo-mpi"}]}

    @app.get("/health")
    async def health_check():
        return api.status()

    return app
