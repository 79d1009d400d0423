"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), served from rank 0.

    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "seed",
                                 "stop", "stream"}
    POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], ...the same}
    GET  /v1/models             the one model this server runs
    GET  /health                ranks, mode, link on-time rates, requests queued and running

Streaming answers are server-sent events, one chunk per piece of text and `data: [DONE]` at the
end. Errors have OpenAI's shape ({"error": {"message", "type", "param", "code"}}): 400 for a bad
field or a prompt that leaves no room in the context, 404 for another model, 503 when the queue
is full or the server is going down.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .broker import Broker, Job

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


def make_app(broker: Broker, tok, model_name: str, context: int, health: Callable[[], dict],
             default_max_tokens: int = 128) -> FastAPI:
    """The app; `health()` adds what the running mode knows (ranks, links) to /health."""
    app = FastAPI(title="halo-mpi", docs_url=None, redoc_url=None)

    async def parse(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        model = body.get("model", model_name)
        if model != model_name:
            raise BadRequest(f"model {model!r} is not served here; this server runs {model_name!r}",
                             "model", status=404, kind="invalid_request_error")
        return body

    def job_of(body: dict, text: str) -> Job:
        ids = tok.encode(text)
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        if len(ids) >= context:
            raise BadRequest(f"the prompt has {len(ids)} tokens; the model's context is {context}",
                             "prompt")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", default_max_tokens))
        if max_tokens is None:
            max_tokens = default_max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
        seed = body.get("seed", 0)
        if seed is None:
            seed = 0
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BadRequest(f"seed must be an integer, got {seed!r}", "seed")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false", "stream")
        return Job(ids, min(max_tokens, context - len(ids)), number(body, "temperature", 1.0, 0.0, 2.0),
                   number(body, "top_p", 1.0, 0.0, 1.0), seed, stops(body))

    async def submit(job: Job):
        if broker.closed.is_set():
            raise BadRequest("the server is shutting down", status=503, kind="server_error")
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        if not broker.submit(job):
            raise BadRequest(f"the queue is full ({broker.jobs.maxsize} requests waiting); retry later",
                             status=503, kind="server_error")

    async def respond(job: Job, stream: bool, chat: bool):
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                return {"id": ident, "object": "chat.completion.chunk", "created": created,
                        "model": model_name, "choices": [choice]}
            return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

        def usage(d: dict) -> dict:
            return {"prompt_tokens": d["prompt_tokens"], "completion_tokens": d["completion_tokens"],
                    "total_tokens": d["prompt_tokens"] + d["completion_tokens"]}

        def finish_reason(d: dict) -> str:
            return d["finish_reason"] if d["finish_reason"] in ("stop", "length") else "stop"

        if stream:
            async def events():
                try:
                    if chat:
                        yield f"data: {json.dumps(chunk(None, None, first=True))}\n\n"
                    while True:
                        what, value = await job.events.get()
                        if what == "text":
                            yield f"data: {json.dumps(chunk(value, None))}\n\n"
                            continue
                        if value["error"]:
                            failed = {"error": {"message": value["error"], "type": "server_error"}}
                            yield f"data: {json.dumps(failed)}\n\n"
                        else:
                            last = chunk(None, finish_reason(value))
                            last["usage"] = usage(value)
                            yield f"data: {json.dumps(last)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                finally:                      # the client went away, or the stream ended
                    job.cancelled.set()
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces = []
        try:
            while True:
                what, value = await job.events.get()
                if what == "text":
                    pieces.append(value)
                    continue
                break
        finally:
            job.cancelled.set()
        if value["error"]:
            raise BadRequest(value["error"], status=500, kind="server_error")
        text = "".join(pieces)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish_reason(value)}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason(value), "logprobs": None}
        return JSONResponse({"id": ident, "object": kind, "created": created, "model": model_name,
                             "choices": [choice], "usage": usage(value)})

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, e: BadRequest):
        return error_response(e)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string (one prompt per request)", "prompt")
        job = job_of(body, prompt)
        await submit(job)
        return await respond(job, body.get("stream", False), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list", "messages")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise BadRequest("each message needs a role (system, user or assistant) and a string "
                                 "content", "messages")
        job = job_of(body, tok.chat_messages(messages))
        await submit(job)
        return await respond(job, body.get("stream", False), chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "halo-mpi"}]}

    @app.get("/health")
    async def health_check():
        return {"status": "shutting down" if broker.closed.is_set() else "ok", "model": model_name,
                "queued": broker.queued, "running": broker.running, "served": broker.served, **health()}

    return app
