"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), served from rank 0.

    POST /v1/completions        {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop",
                                 "stream", "n", "logprobs", "presence_penalty", "frequency_penalty",
                                 "logit_bias", ...}: serve/fields.py checks every one
    POST /v1/chat/completions   {"messages": [{"role", "content"}], ...the same, "top_logprobs"}
    GET  /v1/models, /v1/models/{id}   the one model this server runs
    POST /tokenize {"content"} -> {"tokens"};  POST /detokenize {"tokens"} -> {"content"}
    GET  /health                ranks, mode, the batch it supports (max_batch) and runs now (batch),
                                per-rank figures, sequences queued and running
    GET  /metrics               Prometheus's text format (serve/metrics.py)
    GET  /                      a chat page that streams from the API, beside the cluster live

Errors have OpenAI's shape ({"error": {"message", "type", "param", "code"}}): 400 for a bad or
unsupported field, 401 without the key (`--api-key`; /health needs none), 404 for another model
or route, 405, 413 for a body over `--max-body`, 500 when generating failed (that request only),
503 when the queue is full or the server is going down.

`Api` checks a request (tokenizing off the event loop) and hands its `Job` to the broker; an
`Answer` (serve/answer.py) turns the job's events into the response; `make_app` only routes.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .answer import Answer
from .broker import Broker, Job
from .fields import BadRequest, content_text, is_int, messages_of, prompt_of, sampling_fields, short
from .metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:
    from ..model.tokenizer import Tokenizer

PAGE = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
MAX_BODY = 4 << 20        # bytes: some 500 pages of text, far above a full context of 8192 tokens


def error_response(e: BadRequest) -> JSONResponse:
    code = "invalid_api_key" if e.status == 401 else None
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param,
                                   "code": code}}, status_code=e.status)


async def read_body(request: Request, limit: int) -> bytes:
    too_large = BadRequest(f"the body is over the server's limit of {limit} bytes (--max-body)",
                           status=413)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):        # not JSON, not UTF-8, nested too deep, a huge int
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


@dataclass
class Api:
    """What a request is checked against, and where its job goes."""
    broker: Broker
    tok: Tokenizer
    model_name: str
    context: int                   # tokens: prompt plus completion
    health: Callable[[], dict]     # what the running mode knows (ranks, links)
    metrics: Metrics
    default_max_tokens: int = 128
    max_body: int = MAX_BODY
    api_key: str | None = None

    async def authorize(self, request: Request):
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise BadRequest("a valid API key is needed: send it as \"Authorization: Bearer KEY\"",
                             status=401)

    async def parse(self, request: Request) -> dict:
        body = json_object(await read_body(request, self.max_body))
        model = body.get("model", self.model_name)
        if isinstance(model, str) and model != self.model_name:
            raise BadRequest(f"model {short(model)} is not served here; this server runs "
                             f"{self.model_name!r}", "model", status=404)
        return body

    async def jobs_of(self, body: dict, chat: bool) -> tuple[list[Job], Answer]:
        """Every field checked first; then the prompt tokenized in a thread (a long one would
        hold the event loop, and /health with it). A job per choice (n), each seeded apart, so
        that sampled choices differ."""
        vocab = self.tok.vocab_size
        params = sampling_fields(body, chat, vocab)
        prompt = self.tok.chat_messages(messages_of(body)) if chat else prompt_of(body, vocab)
        param = "messages" if chat else "prompt"
        ids = prompt if isinstance(prompt, list) else await self.encode(prompt, param)
        if not ids:
            raise BadRequest("the prompt is empty", param)
        if len(ids) >= self.context:
            raise BadRequest(f"the prompt has {len(ids)} tokens; the model's context is {self.context}",
                             param)
        max_tokens = params.max_tokens or self.default_max_tokens
        jobs = [Job(ids, min(max_tokens, self.context - len(ids)), params.temperature, params.top_p,
                    (params.seed + i) % 2 ** 64, params.stop, params.sampler_options(),
                    on_done=self.metrics.done, choice=i) for i in range(params.n)]
        return jobs, Answer(jobs, chat, self.model_name, self.tok, params.logprobs)

    async def encode(self, text: str, param: str) -> list[int]:
        """The text's token ids, in a thread; a text too long to fit the context whatever its
        tokens (n bytes are at least n / longest_token_bytes tokens) is refused untokenized."""
        fewest = len(text.encode("utf-8", errors="replace")) // self.tok.longest_token_bytes
        if fewest >= self.context:
            raise BadRequest(f"the prompt has at least {fewest} tokens; the model's context is "
                             f"{self.context}", param)
        return await asyncio.to_thread(self.tok.encode_unlocked, text)

    async def submit(self, jobs: list[Job]):
        """A request's jobs queued together, their events into one queue (or a 503)."""
        if self.broker.closed.is_set():
            raise BadRequest("the server is shutting down", status=503, kind="server_error")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        for job in jobs:
            job.loop, job.events = loop, events
        if not self.broker.submit(*jobs):
            raise BadRequest(f"the queue is full ({self.broker.jobs.maxsize} sequences at most "
                             f"wait, {len(jobs)} asked for); retry later", status=503, kind="server_error")

    async def respond(self, request: Request, chat: bool) -> StreamingResponse | JSONResponse:
        body = await self.parse(request)
        jobs, answer = await self.jobs_of(body, chat)
        await self.submit(jobs)
        return answer.stream() if body.get("stream") else await answer.collect(request)

    async def tokenize(self, request: Request) -> dict:
        body = json_object(await read_body(request, self.max_body))
        text = content_text(body.get("content"), "body")
        ids = await asyncio.to_thread(self.tok.encode_unlocked, text)
        if body.get("with_pieces") is True:
            return {"tokens": [{"id": i, "piece": self.tok.decode([i])} for i in ids]}
        return {"tokens": ids}

    async def detokenize(self, request: Request) -> dict:
        body = json_object(await read_body(request, self.max_body))
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(is_int(i) and 0 <= i < self.tok.vocab_size for i in ids):
            raise BadRequest(f"tokens must be a list of token ids in [0, {self.tok.vocab_size - 1}]",
                             "tokens")
        return {"content": self.tok.decode(ids)}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "halo-mpi"}

    def status(self) -> dict:
        broker = self.broker
        return {"status": "shutting down" if broker.closed.is_set() else "ok", "model": self.model_name,
                "queued": broker.queued, "running": broker.running, "served": broker.served,
                "ms_per_token": self.metrics.recent_ms_per_token(), "key_required": self.api_key is not None,
                **self.health()}


def make_app(broker: Broker, tok: Tokenizer, model_name: str, context: int, health: Callable[[], dict],
             default_max_tokens: int = 128, *, max_body: int = MAX_BODY,
             api_key: str | None = None) -> FastAPI:
    """The app; `health()` adds what the running mode knows (ranks, links) to /health and
    /metrics; with `api_key`, every route but /health asks for it."""
    metrics = Metrics(lambda: broker.queued, lambda: broker.running, health)
    api = Api(broker, tok, model_name, context, health, metrics, default_max_tokens, max_body, api_key)
    app = FastAPI(title="halo-mpi", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app, metrics)
    keyed = [Depends(api.authorize)]

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request):
        return counted(metrics, request, await api.respond(request, chat=False))

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: Request):
        return counted(metrics, request, await api.respond(request, chat=True))

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=keyed)
    async def model(model_id: str):
        if model_id != model_name:
            raise BadRequest(f"the model {short(model_id)} does not exist; this server runs "
                             f"{model_name!r}", "model", status=404)
        return api.model_card()

    @app.post("/tokenize", dependencies=keyed)
    async def tokenize(request: Request):
        return await api.tokenize(request)

    @app.post("/detokenize", dependencies=keyed)
    async def detokenize(request: Request):
        return await api.detokenize(request)

    @app.get("/metrics", dependencies=keyed)
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health_check():
        return api.status()

    @app.get("/", response_class=HTMLResponse)
    async def page():                     # static; its requests carry the key the user gives it
        return PAGE

    return app


def counted(metrics: Metrics, request: Request, response):
    metrics.answered(request.url.path, response.status_code)
    return response


def add_error_handlers(app: FastAPI, metrics: Metrics):
    """Every error in OpenAI's shape, counted in /metrics."""
    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest):
        return counted(metrics, request, error_response(e))

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, e: HTTPException):
        if e.status_code == 405:
            message = f"method {request.method} is not allowed for {request.url.path}"
        elif e.status_code == 404:
            message = f"invalid URL ({request.method} {request.url.path})"
        else:
            message = str(e.detail)
        return error_response(BadRequest(message, status=e.status_code))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return counted(metrics, request, error_response(BadRequest(
            f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error")))
