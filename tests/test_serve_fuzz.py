"""No request can bring `halo-mpi serve` down: a few hundred generated bodies (random fields,
types and sizes from a seeded RNG, so a failure replays), each answered in OpenAI's shape with a
status a client can act on, and the server healthy after each; then it still serves and stops
cleanly. The tiny model keeps it quick; one process in the serial suite, and the same under
mpiexec for tensor and pipeline mode."""
import json
import random

import pytest
from live_server import MODES, LiveServer, free_port, serve_cmd

BODIES = 300
MAX_BODY = 16384
FIELDS = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
          "stream", "stream_options", "n", "best_of", "presence_penalty", "frequency_penalty",
          "logit_bias", "logprobs", "top_logprobs", "user", "response_format", "tools", "tool_choice",
          "echo", "suffix", "top_k", "messages", "prompt", "", "\u00e9\u0000"]
EDGES = [None, True, False, 0, 1, -1, 2, 0.0, 0.5, 1e-300, -0.0, 2.0000001, 2 ** 63, 2 ** 64,
         -(2 ** 63) - 1, 10 ** 30, 1e308,
         float("nan"), float("inf"), "", "x", "<|im_end|>", "\u00e9" * 3, [], {}, [1], {"a": 1}]


def value(rng: random.Random, depth: int = 0):
    """Anything JSON can carry, edges first."""
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind < 3:
        return rng.choice(EDGES)
    if kind == 3:
        return rng.randint(-(2 ** 70), 2 ** 70) if rng.random() < 0.3 else rng.randint(-3, 300)
    if kind == 4:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.choice([0, 1, 5, 50])))
    if kind == 5:
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6:
        return {rng.choice(FIELDS + ["type", "text", "role", "content"]): value(rng, depth + 1)
                for _ in range(rng.randrange(3))}
    return rng.uniform(-3, 3)


def message(rng: random.Random):
    if rng.random() < 0.2:
        return value(rng, 1)
    role = rng.choice(["system", "developer", "user", "assistant", "tool", "function", "x", None])
    content = rng.choice(["hi", "", [{"type": "text", "text": "hi"}], [{"type": "image_url"}],
                          value(rng, 2)])
    m = {"role": role, "content": content}
    if rng.random() < 0.1:
        m[rng.choice(["name", "tool_calls", "x"])] = value(rng, 2)
    return m


def body(rng: random.Random) -> tuple[str, bytes]:
    """(path, body): mostly a request close to a valid one, with random fields changed."""
    chat = rng.random() < 0.5
    b: dict = {"max_tokens": rng.randint(1, 3)}
    if chat:
        b["messages"] = [message(rng) for _ in range(rng.randint(0, 3))] if rng.random() < 0.7 \
            else [{"role": "user", "content": "hi"}]
    else:
        b["prompt"] = rng.choice(["hi", ["hi"], [1, 2, 3], [[1, 2]], ["a", "b"], [], [600], value(rng, 1)])
    for _ in range(rng.randrange(5)):
        b[rng.choice(FIELDS)] = value(rng)
    if rng.random() < 0.2:              # sampling fields in range, so that some requests generate
        b.update(temperature=rng.choice([1, 1e-300, rng.uniform(0, 2)]),
                 top_p=rng.choice([0, 1e-12, rng.uniform(0, 1)]), seed=rng.randint(0, 2 ** 64 - 1),
                 max_tokens=rng.randint(1, 3), n=1)
    if isinstance(b.get("max_tokens"), int) and b["max_tokens"] > 3:
        b["max_tokens"] = 3             # keeps generation short; other types and ranges stay
    raw = json.dumps(b).encode()
    if rng.random() < 0.05:
        raw = raw[:rng.randrange(len(raw))]                      # cut short: not JSON
    if rng.random() < 0.03:
        raw = json.dumps({**b, "user": "x" * (MAX_BODY + 1)}).encode()   # over --max-body
    return ("/v1/chat/completions" if chat else "/v1/completions"), raw


def check_answer(status: int, raw: bytes, path: str):
    assert status in (200, 400, 404, 413), (status, raw[:300])
    if status != 200:
        error = json.loads(raw)["error"]
        assert isinstance(error["message"], str) and error["type"] == "invalid_request_error"
        return
    if raw.startswith(b"data: "):               # a stream: chunks, then [DONE]; no error event
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]), raw[:300]
    else:
        assert json.loads(raw)["choices"][0]["finish_reason"] in ("stop", "length"), raw[:300]


@pytest.mark.parametrize("mode", list(MODES))
def test_no_generated_body_brings_the_server_down(tiny_store_path, mode):
    ranks, extra = MODES[mode]
    port = free_port()
    live = LiveServer(serve_cmd(tiny_store_path, port, ranks, *extra, "--max-body", MAX_BODY,
                                "--max-tokens", 3), port)
    rng = random.Random(25)
    statuses = {}
    try:
        for i in range(BODIES):
            path, raw = body(rng)
            status, answer = live.post(path, raw)
            check_answer(status, answer, path)
            statuses[status] = statuses.get(status, 0) + 1
            assert live.health()["status"] == "ok", f"body {i}: {raw[:300]!r}"
        assert statuses.get(200, 0) >= 10 and statuses.get(400, 0) >= 100, statuses   # both kinds seen
        status, answer = live.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 2
    finally:
        code, err = live.stop()
    assert code == 0 and "Traceback" not in err, err[-3000:]
