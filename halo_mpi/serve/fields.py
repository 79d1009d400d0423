"""A request's body checked field by field, before anything of it reaches a rank.

    params = sampling_fields(body, chat=True, vocab=49152)   # BadRequest naming the field at fault
    text = chat_text(messages_of(body), tok)                 # or prompt_of(body, vocab): str or ids

Every field OpenAI defines is either honoured, or refused with a 400 that names it (`tools`,
`best_of` > 1, ...); a field OpenAI does not define is refused as OpenAI refuses it ("unrecognized
request argument"). Numbers are checked for type and range here, so a sampler on rank 0 only
ever sees values it can use.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)   # torch.Generator.manual_seed's
MAX_CHOICES = 16                         # n at most: each choice is a sequence of the batch
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_KEYS = {"role", "content", "name"}

COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
          "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user"}
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format",
                 "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
                 "audio", "modalities", "prediction", "reasoning_effort", "web_search_options",
                 "metadata", "store", "service_tier"}
COMPLETIONS = COMMON | {"prompt", "echo", "best_of", "suffix"}
# fields OpenAI defines that this server does not do: refused unless absent or harmless
UNSUPPORTED = {"tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
               "function_call": "function calls", "parallel_tool_calls": "tool calls",
               "audio": "audio output", "modalities": "other modalities", "prediction":
               "predicted outputs", "reasoning_effort": "reasoning models", "web_search_options":
               "web search", "metadata": "stored completions", "store": "stored completions",
               "service_tier": "service tiers", "suffix": "suffixes (insertion)",
               "echo": "echoing the prompt"}


class BadRequest(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


@dataclass
class Sampling:
    """What a request asks of generation, every value in range."""
    max_tokens: int | None            # None: the server's default
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    n: int = 1                        # choices: sequences of the one prompt, each its own seed
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None       # None: none; k: each token's and the k likeliest

    def sampler_options(self) -> dict:
        """Sampler's keyword arguments beyond temperature, top_p and seed."""
        return {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logit_bias": self.logit_bias, "top_logprobs": self.logprobs}


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise BadRequest(f"{name} must be a number in [{lo:g}, {hi:g}], got {short(value)}", name)
    return float(value)


def integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise BadRequest(f"{name} must be an integer {span}, got {short(value)}", name)
    return value


def flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {short(value)}", name)
    return value


def short(value) -> str:
    """A value for an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_names(body: dict, chat: bool):
    known = CHAT if chat else COMPLETIONS
    for name in body:
        if name not in known:
            raise BadRequest(f"unrecognized request argument supplied: {short(name)}", str(name)[:80])
    for name, what in UNSUPPORTED.items():
        value = body.get(name)
        if value in (None, False, [], {}) or (name == "tool_choice" and value == "none"):
            continue
        raise BadRequest(f"{name} is not supported: this server does no {what}", name)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise BadRequest("response_format is not supported other than {\"type\": \"text\"} "
                         "(no JSON mode or schemas)", "response_format")


def choices(body: dict) -> int:
    """n: the choices asked for (sequences of the one prompt, decoded together when the mode
    batches); best_of other than 1 is refused (no ranking of candidates here)."""
    best_of = integer(body, "best_of", 1)
    if best_of is not None and best_of > 1:
        raise BadRequest(f"best_of = {best_of}: this server does not rank candidates; ask for n "
                         f"choices instead", "best_of")
    n = integer(body, "n", 1, MAX_CHOICES)
    return 1 if n is None else n


def stops(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > 4 or not all(isinstance(s, str) for s in value):
        raise BadRequest("stop must be a string or a list of at most 4 strings", "stop")
    return [s for s in value if s]


def logit_bias(body: dict, vocab: int) -> dict[int, float]:
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("logit_bias must be an object of token id -> bias", "logit_bias")
    bias = {}
    for key, b in value.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab or str(token) != key.strip():
            raise BadRequest(f"logit_bias: {short(key)} is not a token id (0 to {vocab - 1})", "logit_bias")
        if isinstance(b, bool) or not isinstance(b, int | float) or not -100 <= b <= 100:
            raise BadRequest(f"logit_bias[{key}] must be a number in [-100, 100], got {short(b)}",
                             "logit_bias")
        bias[token] = float(b)
    return bias


def logprobs(body: dict, chat: bool) -> int | None:
    if not chat:                         # completions: logprobs is the count of alternatives
        return integer(body, "logprobs", 0, 5)
    top = integer(body, "top_logprobs", 0, 20)
    if not flag(body, "logprobs"):
        if top is not None:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    return top or 0


def stream_options(body: dict, stream: bool):
    value = body.get("stream_options")
    if value is None:
        return
    if not stream:
        raise BadRequest("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(value, dict) or set(value) - {"include_usage"} or \
            not isinstance(value.get("include_usage", False), bool):
        raise BadRequest("stream_options must be {\"include_usage\": true|false}", "stream_options")


def seed_of(body: dict) -> int:
    value = integer(body, "seed", *SEED_RANGE)
    return secrets.randbits(63) if value is None else value     # no seed: a fresh one


def sampling_fields(body: dict, chat: bool, vocab: int) -> Sampling:
    """Every field but the prompt or messages, checked; BadRequest names the one at fault."""
    check_names(body, chat)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise BadRequest(f"model must be a string, got {short(body['model'])}", "model")
    if not isinstance(body.get("user", ""), str):
        raise BadRequest("user must be a string", "user")
    n = choices(body)
    max_tokens = integer(body, "max_tokens", 1)
    if chat and max_tokens is None:
        max_tokens = integer(body, "max_completion_tokens", 1)
    stream = flag(body, "stream")
    stream_options(body, stream)
    return Sampling(max_tokens, number(body, "temperature", 1.0, 0.0, 2.0),
                    number(body, "top_p", 1.0, 0.0, 1.0), seed_of(body), stops(body), stream, n,
                    number(body, "presence_penalty", 0.0, -2.0, 2.0),
                    number(body, "frequency_penalty", 0.0, -2.0, 2.0), logit_bias(body, vocab),
                    logprobs(body, chat))


def content_text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise BadRequest(f"{where}.content must be a string or a non-empty list of text parts", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else None
            raise BadRequest(f"{where}.content[{j}] must be {{\"type\": \"text\", \"text\": ...}}"
                             + (f"; {short(kind)} parts are not supported (a text model)" if kind else ""),
                             f"{where}.content[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def messages_of(body: dict) -> list[dict]:
    """The conversation as [{"role", "content": str}] in ChatML's roles (developer is system)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object with a role and a content", where)
        role = m.get("role")
        if role in ("tool", "function"):
            raise BadRequest(f"{where}.role {role!r} is not supported: this server does no tool calls",
                             f"{where}.role")
        if role not in ROLES:
            raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)}, got {short(role)}",
                             f"{where}.role")
        extra = set(m) - MESSAGE_KEYS
        if extra:
            name = sorted(map(str, extra))[0]
            raise BadRequest(f"{where}.{short(name)} is not supported (a message has role, content "
                             "and name)", f"{where}.{name[:80]}")
        if not isinstance(m.get("name", ""), str):
            raise BadRequest(f"{where}.name must be a string", f"{where}.name")
        out.append({"role": ROLES[role], "content": content_text(m.get("content"), where)})
    return out


def prompt_of(body: dict, vocab: int) -> str | list[int]:
    """A completion's prompt: a string or token ids, alone or as a list of one."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        if not all(0 <= t < vocab for t in prompt):
            raise BadRequest(f"prompt: token ids must be in [0, {vocab - 1}]", "prompt")
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise BadRequest(f"prompt: {len(prompt)} prompts; this server takes one per request (several "
                         "come with batching)", "prompt")
    raise BadRequest("prompt must be a string, a list of token ids, or a list of one of those", "prompt")
