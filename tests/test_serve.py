"""`halo-mpi serve` as users run it (a subprocess, under mpiexec for tensor mode), exercised with
the official `openai` client. Traffic goes to 127.0.0.1 only; every test's server is stopped."""
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import halo
from live_server import MODES, LiveServer, free_port, serve_cmd

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module", params=list(MODES))
def server(request, real_store_path):
    port = free_port()
    ranks, extra = MODES[request.param]
    live = LiveServer(serve_cmd(real_store_path, port, ranks, *extra), port)
    live.mode = request.param
    yield live
    code, err = live.stop()
    assert code == 0, err
    assert "server stopped" in err


def generated_text(weights, *args) -> str:
    done = halo("generate", "--weights", weights, "--temperature", 0, "--quiet", *args, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.rstrip("\n")


@pytest.mark.slow
def test_streamed_chat_equals_generate_chat(server, real_store_path):
    client = server.client()
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=24, temperature=0, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    want = generated_text(real_store_path, "--chat", "--prompt", PROMPT, "--max-new-tokens", "24")
    assert "".join(pieces) == want and finish in ("stop", "length")


@pytest.mark.slow
def test_completion_with_usage_stop_and_four_clients_at_once(server):
    client = server.client()
    model = client.models.list().data[0].id
    one = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12,
                                    temperature=0)
    assert one.usage.prompt_tokens == 5 and one.usage.completion_tokens == 12
    assert one.choices[0].finish_reason == "length" and one.choices[0].text.strip()
    stopped = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12,
                                        temperature=0, stop=["."])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == one.choices[0].text.split(".")[0]
    answers: dict[int, str] = {}

    def ask(i: int):
        r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12,
                                      temperature=0)
        answers[i] = r.choices[0].text
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert answers == {i: one.choices[0].text for i in range(4)}      # queued, all complete


@pytest.mark.slow
def test_bad_requests_get_the_documented_errors(server):
    import openai
    client = server.client()
    model = client.models.list().data[0].id
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=model, prompt="x", max_tokens=2, temperature=7)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=model, prompt="word " * 9000, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=model, messages=[], max_tokens=2)
    req = urllib.request.Request(server.url + "/v1/completions", data=b"not json",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["type"] == "invalid_request_error"


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_leaves_the_server_serving(server):
    client = server.client()
    model = client.models.list().data[0].id
    stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=400,
                                       temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()                                          # the connection goes away
    end = time.monotonic() + 60
    while server.health()["running"] and time.monotonic() < end:   # its job ends at the next token
        time.sleep(0.2)
    health = server.health()
    assert health["running"] == 0 and health["queued"] == 0
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"
    if server.mode != "single":
        assert health["ranks"] == 2 and server.mode in health["mode"]


def test_a_port_in_use_is_one_clear_error(tiny_store_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = halo("serve", "--weights", tiny_store_path, "--port", port, timeout=120)
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def test_a_full_queue_and_a_closing_server_answer_503(tiny_store):
    """The API alone, no model running: the queue holds one job, the next request is refused."""
    from fastapi.testclient import TestClient

    from halo_mpi.model.tokenizer import Tokenizer
    from halo_mpi.serve.api import make_app
    from halo_mpi.serve.broker import Broker, Job
    broker = Broker(capacity=1)
    assert broker.submit(Job([1, 2], 4))
    health = lambda: {"mode": "none", "ranks": 1}      # noqa: E731
    app = make_app(broker, Tokenizer.from_store(tiny_store), "tiny", 256, health)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
        assert r.status_code == 503 and "queue is full" in r.json()["error"]["message"]
        assert client.get("/health").json()["queued"] == 1
        broker.closed.set()
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def rank_pids(port: int) -> dict[int, int]:
    """rank -> pid of the processes serving on `port` (from their MPI environment)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and str(port).encode() in cmd and b"halo_mpi.cli" in cmd:
            rank = next((int(e.split(b"=")[1]) for e in env if e.startswith(b"PMI_RANK=")), None)
            if rank is not None:
                out[rank] = int(pid)
    return out


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_a_worker_that_dies_ends_the_server_with_an_error(tiny_store_path, mode):
    port = free_port()
    ranks, extra = MODES[mode]
    live = LiveServer(serve_cmd(tiny_store_path, port, ranks, *extra), port)
    try:
        os.kill(rank_pids(port)[1], signal.SIGKILL)
        code = live.proc.wait(timeout=60)        # never a hang
    finally:
        code, err = live.stop()
    assert code != 0


def metric(server, name: str, **labels) -> float:
    """A sample of /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families
    status, text = server.get("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for(condition, what: str, timeout: float = 120):
    """Polls `condition` (a hang guard, not a timing: the wait ends as soon as it holds)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"still waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_non_streaming_client_that_leaves_is_cancelled(server):
    before = metric(server, "halo_finished_total", reason="cancelled")
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: server.health()["running"] == 1, "the request to run")
    wait_for(lambda: server.health()["running"] == 0, "the request to be cancelled")
    assert metric(server, "halo_finished_total", reason="cancelled") == before + 1


@pytest.mark.slow
def test_metrics_count_requests_tokens_and_each_ranks_share(server):
    tokens = metric(server, "halo_completion_tokens_total")
    answered = metric(server, "halo_requests_total", endpoint="/v1/completions", status="200")
    firsts = metric(server, "halo_time_to_first_token_seconds_count")
    client = server.client()
    r = client.completions.create(model=client.models.list().data[0].id, prompt="The capital of France is",
                                  max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5
    assert metric(server, "halo_completion_tokens_total") == tokens + 5
    assert metric(server, "halo_requests_total", endpoint="/v1/completions", status="200") == answered + 1
    assert metric(server, "halo_time_to_first_token_seconds_count") == firsts + 1
    assert metric(server, "halo_time_per_output_token_seconds_sum") > 0
    assert metric(server, "halo_queue_length") == 0
    if server.mode == "tensor":                 # strict sync: every partial waited for
        shares = [metric(server, "halo_rank_group_share", rank=str(r)) for r in range(2)]
        assert sum(shares) == pytest.approx(1.0) and min(shares) > 0
        assert [metric(server, "halo_rank_on_time_rate", rank=str(r)) for r in range(2)] == [1.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_sigterm_cuts_the_streams_refuses_the_queue_and_every_rank_exits_0(real_store_path, mode):
    import openai
    ranks, extra = MODES[mode]
    port = free_port()
    batch = ("--max-batch", "2") if mode in ("single", "tensor") else ()
    live = LiveServer(serve_cmd(real_store_path, port, ranks, *extra, *batch), port)
    others: list = []

    def ask(client):
        try:
            r = client.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=500)
            others.append(r.choices[0].finish_reason)
        except openai.APIStatusError as e:
            others.append(e.status_code)
    try:
        client = live.client()
        stream = iter(client.completions.create(model="smollm2-135m", prompt="Once upon a time",
                                                max_tokens=500, temperature=0, stream=True))
        next(stream)                                      # it runs
        # one more runs in pipeline mode and in the batch of 2, then one queues
        slots = ranks if mode == "pipeline" else 2
        threads = [threading.Thread(target=ask, args=(client,)) for _ in range(slots)]
        for t in threads:
            t.start()
        wait_for(lambda: live.health()["queued"] >= 1, "a request to queue")
        live.proc.send_signal(signal.SIGTERM)
        chunks = list(stream)
        for t in threads:
            t.join(120)
    finally:
        code, err = live.stop()
    assert chunks[-1].choices[0].finish_reason == "shutdown" and chunks[-1].usage.completion_tokens < 500
    assert 503 in others and set(others) <= {503, "shutdown"}, others
    assert code == 0 and "server stopped" in err, err[-2000:]
