"""The OpenAI surface of `halo-mpi serve` field by field, with the official `openai` client, on
the tiny model in one process (quick); and the API key it asks for."""
import json
import threading

import openai
import pytest
from conftest import halo
from live_server import LiveServer, free_port, serve_cmd

KEY = "test-key-25"


@pytest.fixture(scope="module")
def live(tiny_store_path):
    port = free_port()
    server = LiveServer(serve_cmd(tiny_store_path, port, 1, "--api-key", KEY, "--max-body", 65536,
                                  "--max-tokens", 8), port)
    yield server
    code, err = server.stop()
    assert code == 0, err


@pytest.fixture(scope="module")
def client(live):
    return live.client(KEY)


def error_of(e: pytest.ExceptionInfo) -> dict:
    body = e.value.body           # the client hands over the "error" object, or the whole body
    return body if isinstance(body, dict) and "message" in body else body["error"]


def completion(client, **fields):
    return client.completions.create(model="tiny", **{"prompt": "hello", "max_tokens": 6, **fields})


def chat(client, messages, **fields):
    return client.chat.completions.create(model="tiny", messages=messages, **{"max_tokens": 6, **fields})


def test_the_key_is_asked_for_by_every_route_but_health(live, client):
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError) as e:
            completion(live.client(key or "x"))
        assert e.value.status_code == 401 and "Authorization: Bearer" in error_of(e)["message"]
    status, body = live.get("/metrics")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert live.health()["status"] == "ok"
    assert completion(client, temperature=0).usage.completion_tokens == 6


@pytest.mark.parametrize("flags,says", [(("--host", "0.0.0.0"), "is not a loopback address"),
                                        (("--api-key-file", "/nonexistent/key"), "--api-key-file"),
                                        (("--api-key", " "), "--api-key is empty")])
def test_an_open_host_without_a_key_is_one_clear_error(tiny_store_path, flags, says):
    done = halo("serve", "--weights", tiny_store_path, "--port", free_port(), *flags, timeout=120)
    assert done.returncode == 2 and says in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_key_file_opens_a_non_loopback_host(tiny_store_path, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    server = LiveServer(serve_cmd(tiny_store_path, port, 1, "--host", "0.0.0.0", "--api-key-file", key_file),
                        port)
    try:
        assert completion(server.client(KEY), max_tokens=2, temperature=0).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            completion(server.client("other"), max_tokens=2)
    finally:
        code, err = server.stop()
    assert code == 0, err


@pytest.mark.parametrize("n", [0, -1, "x", 1.5, True, 17])
def test_n_out_of_range_is_a_400_naming_it(client, n):
    with pytest.raises(openai.BadRequestError) as e:
        completion(client, extra_body={"n": n})
    assert error_of(e)["param"] == "n"
    assert "n must be an integer in [1, 16]" in error_of(e)["message"]


def test_best_of_above_one_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as e:
        completion(client, extra_body={"best_of": 2})
    assert error_of(e)["param"] == "best_of"


def test_n_one_is_served(client):
    assert len(chat(client, [{"role": "user", "content": "hi"}], n=1).choices) == 1


@pytest.mark.parametrize("fields,param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"top_k": 40}, "top_k"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"512": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"seed": 2 ** 64}, "seed"),
])
def test_fields_not_served_or_out_of_range_are_400s_naming_them(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [{"role": "user", "content": "hi"}], extra_body=fields)
    assert error_of(e)["param"] == param


def test_the_issues_two_bodies(live):
    messages = [{"role": "user", "content": "hi"}]
    status, body = live.post("/v1/chat/completions", {"messages": messages, "max_tokens": 2, "temperature": 1,
                                                      "top_p": 0}, {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2
    status, body = live.post("/v1/chat/completions", {"messages": messages, "max_tokens": 2,
                                                      "seed": 18446744073709551616},
                             {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and json.loads(body)["error"]["param"] == "seed"


def test_logprobs_of_chat_and_completions(client):
    r = chat(client, [{"role": "user", "content": "hi"}], temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)     # greedy: the likeliest
    r = completion(client, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    streamed = completion(client, temperature=0, logprobs=2, stream=True)
    tokens = [t for chunk in streamed for t in (chunk.choices[0].logprobs.tokens if chunk.choices else [])]
    assert tokens == lp.tokens
    assert chat(client, [{"role": "user", "content": "hi"}]).choices[0].logprobs is None


def test_logit_bias_decides_greedy_tokens(live, client):
    token = 300
    r = completion(client, temperature=0, logit_bias={str(token): 100})
    status, body = live.post("/detokenize", {"tokens": [token] * r.usage.completion_tokens},
                             {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and r.choices[0].text == json.loads(body)["content"]


def test_a_random_seed_unless_one_is_given(client):
    texts = [completion(client, temperature=1, max_tokens=8).choices[0].text for _ in range(2)]
    assert texts[0] != texts[1]
    seeded = [completion(client, temperature=1, max_tokens=8, seed=7).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_content_parts_the_developer_role_and_prompt_lists(live, client):
    said = chat(client, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}],
                temperature=0).choices[0].message.content
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]
    assert chat(client, [{"role": "developer", "content": "be brief"}, {"role": "user", "content": parts}],
                temperature=0).choices[0].message.content == said
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [{"role": "user", "content": "hi"},
                      {"role": "tool", "content": "x", "tool_call_id": "1"}])
    assert error_of(e)["param"] == "messages[1].role"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert error_of(e)["param"] == "messages[0].content[0]"
    status, body = live.post("/tokenize", {"content": "hello"}, {"Authorization": f"Bearer {KEY}"})
    ids = json.loads(body)["tokens"]
    text = completion(client, temperature=0).choices[0].text
    assert completion(client, prompt=ids, temperature=0).choices[0].text == text
    assert completion(client, prompt=["hello"], temperature=0).choices[0].text == text
    with pytest.raises(openai.BadRequestError) as e:
        completion(client, prompt=["hello", "bye"])
    assert error_of(e)["param"] == "prompt"


def test_routes_models_tokenize_and_the_body_limit(live, client):
    key = {"Authorization": f"Bearer {KEY}"}
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    status, body = live.post("/v1/nowhere", {}, key)
    assert status == 404 and json.loads(body)["error"]["message"] == "invalid URL (POST /v1/nowhere)"
    status, body = live.get("/v1/completions", key)
    assert status == 405 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, body = live.post("/tokenize", {"content": "hello world"}, key)
    ids = json.loads(body)["tokens"]
    status, body = live.post("/detokenize", {"tokens": ids}, key)
    assert json.loads(body)["content"] == "hello world"
    status, body = live.post("/detokenize", {"tokens": [512]}, key)
    assert status == 400 and json.loads(body)["error"]["param"] == "tokens"
    status, body = live.post("/v1/completions", {"prompt": "x" * 70000}, key)
    assert status == 413 and "--max-body" in json.loads(body)["error"]["message"]
    assert live.health()["status"] == "ok"


def test_metrics_give_each_ranks_share_on_time_rate_and_drops(tiny_store_path):
    """Tensor mode under HALO sync with emulated loss on rank 1's link (seeded): /metrics has a
    row per rank, the shares add up, and the late partials of rank 1 are counted. Rank 1 keeps a
    real share, waited for until its deadline (not a probe, whose partials rank 0 computes itself
    and judges only as they come: the drop budget and the backups would make it one)."""
    from prometheus_client.parser import text_string_to_metric_families
    port = free_port()
    server = LiveServer(serve_cmd(tiny_store_path, port, 2, "--parallel", "tensor", "--sync", "halo",
                                  "--link-loss", "1:0.3", "--loss-model", "rto", "--drop-budget", "1",
                                  "--backup-share", "0"), port)
    try:
        r = completion(server.client(), max_tokens=16, temperature=0)
        assert r.usage.completion_tokens == 16
        status, text = server.get("/metrics")
    finally:
        code, err = server.stop()
    assert code == 0, err
    samples = {(s.name, s.labels.get("rank")): s.value
               for family in text_string_to_metric_families(text.decode()) for s in family.samples}
    shares = [samples[("halo_rank_group_share", str(r))] for r in range(2)]
    assert sum(shares) == pytest.approx(1.0) and min(shares) > 0
    assert samples[("halo_rank_on_time_rate", "0")] == 1.0 and samples[("halo_rank_dropped_layers", "0")] == 0
    assert samples[("halo_rank_dropped_layers", "1")] >= 1 and samples[("halo_rank_on_time_rate", "1")] < 1
    assert samples[("halo_completion_tokens_total", None)] == 16
    assert ("halo_rank_dropped_share", "1") in samples and ("halo_dropped_importance_share", None) in samples


def test_penalties_turn_greedy_text_away_from_repeats(client):
    """The tiny model repeats itself at temperature 0 after "hello"; the penalties break that."""
    def distinct(**fields) -> int:
        r = completion(client, temperature=0, max_tokens=8, logprobs=0, **fields)
        return len(set(r.choices[0].logprobs.tokens))
    plain = distinct()
    assert plain < 8                                           # it repeats
    assert distinct(frequency_penalty=2.0) > plain
    assert distinct(presence_penalty=2.0) > plain


def test_n_choices_whole_and_streamed(client):
    """n > 1: n sequences of the one prompt, indexed 0..n-1, each seeded apart; the usage counts
    the prompt once and every choice's tokens."""
    r = completion(client, n=3, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 1                     # greedy: the same text
    assert r.usage.prompt_tokens == completion(client, max_tokens=1).usage.prompt_tokens
    assert r.usage.completion_tokens == 15
    stream = chat(client, [{"role": "user", "content": "hi"}], n=2, max_tokens=4, temperature=1.5,
                  seed=7, stream=True)
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert set(finishes) == {0, 1} and usage.completion_tokens <= 8
    one = chat(client, [{"role": "user", "content": "hi"}], max_tokens=4, temperature=1.5, seed=7)
    assert one.choices[0].message.content == texts[0]                # choice 0 has the request's seed


def steps_by_batch(live) -> dict[int, float]:
    from prometheus_client.parser import text_string_to_metric_families
    status, text = live.get("/metrics", {"Authorization": f"Bearer {KEY}"})
    assert status == 200
    return {int(s.labels["batch"]): s.value for family in text_string_to_metric_families(text.decode())
            for s in family.samples if s.name == "halo_steps_by_batch_total"}


def test_concurrent_requests_share_steps_and_health_says_the_batch(live, client):
    """The n choices of a request are queued together, so they run in the same steps (one
    request at a time they could not); four clients at once all get the greedy answer."""
    health = live.health()
    assert health["max_batch"] == 8 and "batches of up to 8" in health["batching"]
    before = steps_by_batch(live)
    r = completion(client, n=4, max_tokens=8, temperature=0)
    after = steps_by_batch(live)
    shared = sum(after.get(b, 0) - before.get(b, 0) for b in after if b >= 2)
    assert shared >= 7 and len({c.text for c in r.choices}) == 1
    answers = {}

    def ask(i):
        answers[i] = completion(client, max_tokens=8, temperature=0, stream=False).choices[0].text
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == {i: r.choices[0].text for i in range(4)}


def test_max_batch_one_serves_one_sequence_per_step(tiny_store_path):
    port = free_port()
    server = LiveServer(serve_cmd(tiny_store_path, port, 1, "--max-batch", 1), port)
    try:
        r = completion(server.client(), n=2, max_tokens=3, temperature=0)
        assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == r.choices[1].text
        health = server.health()
        assert health["max_batch"] == 1 and "one sequence per step" in health["batching"]
    finally:
        code, err = server.stop()
    assert code == 0 and "one sequence per step" in err, err


def test_tensor_mode_serves_a_requests_choices_in_shared_steps(tiny_store_path):
    """Tensor mode batches too (-n 2, strict): a request's 3 choices run in the same steps, each
    the greedy answer, and /health says what a step carries."""
    port = free_port()
    server = LiveServer(serve_cmd(tiny_store_path, port, 2, "--parallel", "tensor", "--sync", "strict"), port)
    try:
        r = completion(server.client(), n=3, max_tokens=5, temperature=0)
        health = server.health()
    finally:
        code, err = server.stop()
    assert len({c.text for c in r.choices}) == 1 and [c.index for c in r.choices] == [0, 1, 2]
    assert health["max_batch"] == 8 and "every sequence's rows" in health["batching"]
    shared = sum(n for b, n in health["steps_by_batch"].items() if int(b) >= 2)
    assert shared >= 4 and max(int(b) for b in health["steps_by_batch"]) == 3, health
    assert code == 0, err[-2000:]
