"""Pipeline mode: the layer split, the ring as threads (LocalHub), under mpiexec at 2 and 4 ranks,
and the command line launched by mpiexec in a subprocess.

    .venv/bin/python -m pytest -m "not mpi" tests/test_pipeline.py
    .venv/bin/python tests/mpi_run.py 2 -q -m mpi tests/test_pipeline.py
    .venv/bin/python tests/mpi_run.py 4 -q -m mpi tests/test_pipeline.py

Every run is compared with the single-process reference: the same tokens, logits within 1e-3.
"""
import dataclasses
import json
import os
import signal
import uuid

import numpy as np
import pytest
import torch
from conftest import halo, halo_cmd, launched, pid_of_rank

from halo_mpi.errors import HaloError
from halo_mpi.model.generate import LocalSession, generate
from halo_mpi.model.jobs import Job
from halo_mpi.model.llama import Transformer
from halo_mpi.net.devices import Device, read_device_profile
from halo_mpi.options.tree import ModeOptions
from halo_mpi.pipeline.plan import load_stage_model, make_plan
from halo_mpi.pipeline.ring import held_parameters
from halo_mpi.pipeline.run import run_local
from halo_mpi.pipeline.split import StageCosts, split_layers, stage_costs
from halo_mpi.store.hdf5 import Store

LOGIT_TOL = 1e-3


# ---------------------------------------------------------------------------------------------
# fixtures (deep_store: conftest's 8-layer tiny) and the reference

@pytest.fixture(scope="session")
def deep_model(deep_store):
    return Transformer.from_store(deep_store)


class RecordingSession(LocalSession):
    """The reference session, keeping the logits of every sampled position."""

    def __init__(self, model, max_len):
        super().__init__(model, max_len)
        self.logits = []

    def prefill(self, ids):
        self.logits.append(super().prefill(ids))
        return self.logits[-1]

    def decode(self, token):
        self.logits.append(super().decode(token))
        return self.logits[-1]


def reference(model, job: Job):
    session = RecordingSession(model, job.max_len)
    with torch.inference_mode():
        result = generate(session, job.ids, job.max_new, job.sampler(), job.stop_ids)
    return result, session.logits


def make_requests(n: int, vocab: int, seed: int = 0, lengths=None, max_new=None, **sampling) -> list[Job]:
    """n prompts of varied lengths (some longer than a prefill chunk) and token budgets; `sampling`:
    temperature, top_p, seed, stop_ids of every job (greedy by default)."""
    rng = np.random.default_rng(seed)
    lengths = lengths or [1 + (7 * i + 3) % 40 for i in range(n)]
    max_new = max_new or [4 + (5 * i) % 13 for i in range(n)]
    return [Job(rng.integers(3, vocab, size=k).tolist(), m, index=i, **sampling)
            for i, (k, m) in enumerate(zip(lengths, max_new))]


def jobs_of(specs: list[tuple[list[int], int]]) -> list[Job]:
    """(prompt ids, tokens at most) -> greedy jobs indexed in order."""
    return [Job(ids, n, index=i) for i, (ids, n) in enumerate(specs)]


def with_stops(jobs: list[Job], stop_ids: frozenset) -> list[Job]:
    return [dataclasses.replace(job, stop_ids=stop_ids) for job in jobs]


def ring_options(**fields) -> ModeOptions:
    return ModeOptions.of(parallel="pipeline", **fields)


def assert_same_as_reference(run, model, requests):
    assert [s.index for s in run.sequences] == list(range(len(requests)))
    for seq, req in zip(run.sequences, requests):
        ref, ref_logits = reference(model, req)
        assert seq.result.tokens == ref.tokens, f"sequence {seq.index}"
        assert seq.result.stopped_by == ref.stopped_by, f"sequence {seq.index}"
        assert len(seq.logits) == len(ref_logits), f"sequence {seq.index}"
        for step, (got, want) in enumerate(zip(seq.logits, ref_logits)):
            diff = float((got - want).abs().max())
            assert diff < LOGIT_TOL, f"sequence {seq.index}, token {step}: logits differ by {diff}"


def stop_after(model, req: Job, k: int) -> frozenset:
    """A stop set that ends req's greedy continuation at its k-th token (if it recurs earlier, sooner)."""
    ref, _ = reference(model, req)
    assert len(ref.tokens) > k, "the prompt's continuation is too short for this test"
    return frozenset({ref.tokens[k]})


# ---------------------------------------------------------------------------------------------
# the split (serial)

def test_default_split_is_equal_and_contiguous():
    assert split_layers(30, 4) == [range(0, 7), range(7, 14), range(14, 22), range(22, 30)]
    assert split_layers(30, 2) == [range(0, 15), range(15, 30)]
    assert split_layers(8, 1) == [range(0, 8)]
    for n, size in [(8, 3), (22, 4), (30, 7)]:
        split = split_layers(n, size)
        assert [l for r in split for l in r] == list(range(n))
        assert max(map(len, split)) - min(map(len, split)) <= 1


def test_more_ranks_than_layers_is_a_clear_error():
    with pytest.raises(HaloError, match="-n 2 or fewer"):
        split_layers(2, 4)


COSTS = StageCosts(block_bytes=10_000_000, kv_bytes=0, ends_bytes=40_000_000, head_blocks=4.0)


def test_speeds_balance_the_work_and_count_the_head():
    even = split_layers(24, 2, [Device(), Device()], COSTS)
    assert [len(r) for r in even] == [10, 14]              # 10 + head 4 = 14 blocks of work each
    fast0 = split_layers(24, 2, [Device(speed=3.0), Device()], COSTS)
    assert [len(r) for r in fast0] == [17, 7]              # (17 + 4) / 3 = 7



def slowest_stage(counts, devices, head):
    return max((c + (head if r == 0 else 0)) / d.speed for r, (c, d) in enumerate(zip(counts, devices)))


@pytest.mark.parametrize("speeds", [(1, 1, 0.5), (2, 1, 1), (1, 3, 1), (0.7, 1.3, 2.1)])
def test_speed_split_is_optimal(speeds):
    """The greedy split's slowest stage is as fast as the best of all splits (brute force)."""
    import itertools
    devices, n = [Device(speed=s) for s in speeds], 13
    got = [len(r) for r in split_layers(n, 3, devices, COSTS)]
    best = min(slowest_stage(c, devices, COSTS.head_blocks)
               for c in itertools.product(range(1, n), repeat=3) if sum(c) == n)
    assert slowest_stage(got, devices, COSTS.head_blocks) == pytest.approx(best)


def test_memory_budgets_are_respected():
    devices = [Device(memory_mb=70), Device(memory_mb=1000), Device(memory_mb=25)]
    split = split_layers(20, 3, devices, COSTS)
    counts = [len(r) for r in split]
    assert counts[0] <= 3 and counts[2] <= 2 and sum(counts) == 20   # (70-40)/10, 25/10


def test_a_model_that_does_not_fit_names_the_ranks_and_sizes():
    with pytest.raises(HaloError, match=r"do not fit.*rank 0: 3.*rank 1: 5"):
        split_layers(20, 2, [Device(memory_mb=70), Device(memory_mb=55)], COSTS)
    with pytest.raises(HaloError, match=r"rank 0's memory budget of 45 MB.*embedding and head \(40 MB\)"):
        split_layers(20, 2, [Device(memory_mb=45), Device()], COSTS)
    with pytest.raises(HaloError, match=r"rank 1's memory budget of 5 MB"):
        split_layers(20, 2, [Device(), Device(memory_mb=5)], COSTS)


@pytest.mark.slow
def test_stage_costs_of_the_real_shape(real_store):
    c = stage_costs(real_store.args, "float32", kv_tokens=100)
    a = real_store.args
    per_block = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads) + 3 * a.dim * a.hidden_dim + 2 * a.dim
    assert c.block_bytes == 4 * per_block
    assert c.kv_bytes == 2 * a.n_kv_heads * a.head_dim * 4 * 100
    assert 7.5 < c.head_blocks < 8.5           # SmolLM2's tied head streams as much as 8 blocks


def test_device_profile(tmp_path):
    p = tmp_path / "devices.toml"
    p.write_text("[default]\nspeed = 1.5\n[rank.0]\nmemory_mb = 900\n[rank.2]\nspeed = 3\n")
    assert read_device_profile(str(p), 3).ranks == [Device(1.5, 900.0), Device(1.5), Device(3.0)]
    assert read_device_profile(None, 3).ranks == [Device()] * 3
    p.write_text("[rank.1]\nsped = 2\n")
    with pytest.raises(HaloError, match=r"devices.toml \[rank.1\]: unknown key.*sped"):
        read_device_profile(str(p), 2)
    p.write_text("[rank.0]\nspeed = -1\n")
    with pytest.raises(HaloError, match="speed must be a number > 0"):
        read_device_profile(str(p), 2)
    p.write_text("[rank.0\n")
    with pytest.raises(HaloError, match="not valid TOML"):
        read_device_profile(str(p), 2)
    with pytest.raises(HaloError, match="cannot read --device-profile"):
        read_device_profile(str(tmp_path / "missing.toml"), 2)


def test_plan_refuses_empty_prompts_and_sequences_beyond_the_context(deep_store):
    args = deep_store.args
    with pytest.raises(HaloError, match="prompt 1 has 0 tokens"):
        make_plan(args, jobs_of([([5], 3), ([], 3)]), 2, ring_options())
    with pytest.raises(HaloError, match=f"prompt 0 has 250 tokens and asks for 10 more.*{args.max_seq_len}"):
        make_plan(args, jobs_of([([5] * 250, 10)]), 2, ring_options())
    with pytest.raises(HaloError, match="at least one prompt"):
        make_plan(args, [], 2, ring_options())
    assert make_plan(args, jobs_of([([5], 3)] * 3), 2, ring_options(num_sequences=8)).in_flight == 3


# ---------------------------------------------------------------------------------------------
# what each rank loads (serial: every rank's load, one after the other)

def test_each_stage_reads_and_holds_only_its_layers(deep_store_path, deep_store):
    args = deep_store.args
    plan = make_plan(args, make_requests(2, args.vocab_size), 3, ring_options())
    a = args
    per_block = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads) + 3 * a.dim * a.hidden_dim + 2 * a.dim
    for rank, layers in enumerate(plan.split):
        with Store(str(deep_store_path)) as store:
            read = []
            original = store._read
            store._read = (lambda name, sel=(), read=read, original=original:
                           read.append(name) or original(name, sel))
            model, _ = load_stage_model(store, plan, rank, ring_options())
        read_layers = {int(n.split("/")[1]) for n in read if n.startswith("layers/")}
        assert read_layers == set(layers)
        assert set(model.blocks) == set(layers)
        ends = a.vocab_size * a.dim + a.dim if rank == 0 else 0      # tied table + final norm
        assert held_parameters(model) == len(layers) * per_block + ends
        assert ("embedding" in read) == (rank == 0) and ("norm" in read) == (rank == 0)


# ---------------------------------------------------------------------------------------------
# the ring as threads of one process

@pytest.mark.parametrize("size,in_flight", [(1, 1), (1, 3), (2, 1), (2, 4), (3, 3), (3, 6), (4, 2)])
def test_local_ring_equals_the_reference(deep_store, deep_model, size, in_flight):
    requests = make_requests(6, deep_store.args.vocab_size, seed=size)
    run = run_local(deep_store, requests, ring_options(num_sequences=in_flight, prefill_chunk=16), size,
                    keep_logits=True)
    assert_same_as_reference(run, deep_model, requests)
    assert run.pending_requests == 0 and len(run.ranks) == size
    assert all(r["pending_requests_at_end"] == 0 for r in run.ranks)
    assert sum(len(s.result.tokens) for s in run.sequences) == run.tokens > 0


def test_local_ring_stop_token_ends_one_sequence_early(deep_store, deep_model):
    requests = make_requests(4, deep_store.args.vocab_size, seed=11, max_new=[12, 12, 12, 12])
    requests = with_stops(requests, stop_after(deep_model, requests[0], 3))
    run = run_local(deep_store, requests, ring_options(num_sequences=4, prefill_chunk=16), 3,
                    keep_logits=True)
    assert_same_as_reference(run, deep_model, requests)
    first = run.sequences[0].result
    assert first.stopped_by == "end-of-sequence token" and len(first.tokens) <= 3
    assert any(s.result.stopped_by == "max-new-tokens" for s in run.sequences[1:])


def test_local_ring_sampling_matches_the_reference(deep_store, deep_model):
    requests = make_requests(3, deep_store.args.vocab_size, seed=5, temperature=0.9, top_p=0.9)
    requests = [dataclasses.replace(job, seed=7) for job in requests]
    run = run_local(deep_store, requests, ring_options(num_sequences=3), 2, keep_logits=True)
    assert_same_as_reference(run, deep_model, requests)


def test_stats_of_a_local_run_follow_the_shared_schema(deep_store):
    from halo_mpi.stats import RunStats
    requests = jobs_of([([100 + 7 * i + j for j in range(16)], 4 + 12) for i in range(4)])
    run = run_local(deep_store, requests, ring_options(num_sequences=4), 2)
    stats = run.stats()
    d = stats.as_json()
    assert d["mode"] == "pipeline" and d["ranks_total"] == 2 and d["config"]["num_sequences"] == 4
    assert d["tokens"] == 4 * 16 and len(d["decode_ms"]) == 4 * 15
    assert 0 < d["ms_per_token_median"] <= d["ms_per_token_p95"] and d["tokens_per_s"] > 0
    assert [r["rank"] for r in d["ranks"]] == [0, 1] and d["ranks"][1]["layers"] == [4, 8]
    assert RunStats.from_json(json.loads(json.dumps(d))) == stats


def test_local_ring_zero_new_tokens(deep_store, deep_model):
    requests = jobs_of([([5, 6, 7], 0), ([8], 3)])
    run = run_local(deep_store, requests, ring_options(), 2, keep_logits=True)
    assert_same_as_reference(run, deep_model, requests)
    assert run.sequences[0].result.tokens == []


@pytest.mark.parametrize("failing_rank", [0, 1, 2])
def test_local_ring_failure_on_one_rank_ends_all(deep_store, monkeypatch, failing_rank):
    from halo_mpi.pipeline import stage
    run = stage.Stage.run

    def failing_run(self, feeds):
        if self.rank == failing_rank and any(f.step > 0 for f in feeds):
            raise RuntimeError("injected failure")
        return run(self, feeds)

    monkeypatch.setattr(stage.Stage, "run", failing_run)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_local(deep_store, make_requests(3, deep_store.args.vocab_size), ring_options(), 3)


# ---------------------------------------------------------------------------------------------
# under mpiexec (pytest-mpi: tests/mpi_run.py 2|4 -q -m mpi tests/test_pipeline.py)

def mpi_run(path, jobs, options):
    """The ring under MPI, rank 0 keeping every sequence's logits: its run, None elsewhere."""
    from mpi4py import MPI

    from halo_mpi.pipeline.run import RingRank, run_rank
    comm = MPI.COMM_WORLD
    jobs = jobs if comm.rank == 0 else None
    part = RingRank(comm, dataclasses.replace(options, weights=str(path)), jobs)
    try:
        run = part.run(lambda ring, stage, clock: run_rank(ring, stage, jobs, clock, keep_logits=True))
    finally:
        part.close()
    if run is not None:
        run.set_pending(part.pending)
    return run


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("in_flight", range(1, 9))
def test_mpi_ring_equals_the_reference(deep_store_path, deep_model, in_flight):
    from mpi4py import MPI
    requests = make_requests(8, 512, seed=in_flight)
    run = mpi_run(deep_store_path, requests, ring_options(num_sequences=in_flight, prefill_chunk=16))
    if MPI.COMM_WORLD.rank != 0:
        assert run is None
        return
    assert_same_as_reference(run, deep_model, requests)
    assert run.pending_requests == 0
    size = MPI.COMM_WORLD.size
    assert [r["rank"] for r in run.ranks] == list(range(size))
    assert sum(r["n_layers"] for r in run.ranks) == 8
    assert all(0 < r["busy_share"] <= 1 and r["peak_rss_mb"] > 0 for r in run.ranks)


@pytest.mark.mpi(min_size=2)
def test_mpi_sequences_of_different_lengths_and_a_stop_token(deep_store_path, deep_model):
    from mpi4py import MPI
    requests = make_requests(6, 512, seed=21, max_new=[2, 20, 1, 9, 15, 5])
    requests = with_stops(requests, stop_after(deep_model, requests[1], 4))
    run = mpi_run(deep_store_path, requests, ring_options(num_sequences=4, prefill_chunk=8))
    if MPI.COMM_WORLD.rank != 0:
        return
    assert_same_as_reference(run, deep_model, requests)
    assert run.sequences[1].result.stopped_by == "end-of-sequence token"
    assert [len(run.sequences[i].result.tokens) for i in (0, 2)] == [2, 1]
    assert run.pending_requests == 0


@pytest.mark.mpi(min_size=2)
def test_mpi_each_rank_holds_only_its_layers(deep_store_path):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    requests = make_requests(comm.size, 512)
    run = mpi_run(deep_store_path, requests, ring_options(num_sequences=comm.size))
    if comm.rank != 0:
        return
    with Store(str(deep_store_path)) as store:
        a = store.args
        plan = make_plan(a, requests, comm.size, ring_options())
    per_block = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads) + 3 * a.dim * a.hidden_dim + 2 * a.dim
    for r, stats in enumerate(run.ranks):
        layers = plan.split[r]
        assert stats["layers"] == [layers.start, layers.stop]
        ends = a.vocab_size * a.dim + a.dim if r == 0 else 0
        assert stats["parameters"] == len(layers) * per_block + ends


@pytest.mark.mpi(min_size=2)
@pytest.mark.slow
def test_mpi_real_model_equals_the_reference(real_store_path):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    from halo_mpi.model.tokenizer import Tokenizer
    with Store(str(real_store_path)) as store:
        tok = Tokenizer.from_store(store)
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    requests = jobs_of([(tok.encode(p), 6) for p in prompts])
    run = mpi_run(real_store_path, requests, ring_options(num_sequences=comm.size, prefill_chunk=4))
    if comm.rank != 0:
        return
    with Store(str(real_store_path)) as store:
        model = Transformer.from_store(store)
    assert_same_as_reference(run, model, requests)
    assert run.pending_requests == 0


# ---------------------------------------------------------------------------------------------
# the command line under mpiexec, in a subprocess with a timeout

@pytest.fixture(scope="module")
def single_mode_stats(deep_store_path, tmp_path_factory):
    """The single-process run of CLI_PROMPTS (the reference for the pipeline runs below)."""
    path = tmp_path_factory.mktemp("single") / "single.json"
    single = halo(*cli_generate_args(deep_store_path), "--stats-json", path, ranks=1, timeout=240)
    assert single.returncode == 0, single.stderr
    return json.loads(path.read_text())


CLI_PROMPTS = ["hello", "a longer prompt with more words in it", "x"]


def cli_generate_args(weights):
    args = ["generate", "--weights", weights, "--max-new-tokens", 10, "--temperature", 0]
    for p in CLI_PROMPTS:
        args += ["--prompt", p]
    return args


@pytest.mark.parametrize("n", [1, 2, 4])
def test_cli_pipeline_prints_each_sequence_and_equals_single_mode(deep_store_path, tmp_path,
                                                                  single_mode_stats, n):
    prompts, want = CLI_PROMPTS, single_mode_stats["sequences"]
    pipe = halo(*cli_generate_args(deep_store_path), "--parallel", "pipeline", "--num-sequences", 2,
                "--stats-json", tmp_path / "pipe.json", ranks=n, timeout=240)
    assert pipe.returncode == 0, pipe.stderr
    stats = json.loads((tmp_path / "pipe.json").read_text())
    assert [s["tokens"] for s in stats["sequences"]] == [s["tokens"] for s in want]
    assert [s["index"] for s in stats["sequences"]] == [0, 1, 2]
    # each sequence printed whole, labelled by its prompt's index (in the order they finished)
    for i, p in enumerate(prompts):
        assert pipe.stdout.count(f"[{i}] {p}") == 1
    assert stats["mode"] == "pipeline" and stats["pending_requests_at_end"] == 0
    assert stats["tokens_per_s"] > 0 and stats["ms_per_token_median"] > 0
    assert [(r["rank"], r["layers"]) for r in stats["ranks"]] == \
        [(rank, [b.start, b.stop]) for rank, b in enumerate(split_layers(8, n))]
    for r in stats["ranks"]:
        assert {"busy_share", "peak_rss_mb", "compute_s", "wait_s"} <= set(r)
    # resident weights per rank: the stages' shares add up to the single process's (pipeline
    # stages hold whole layers; rank 0 the embedding and head as well)
    single = single_mode_stats["ranks"][0]["weight_bytes"]
    assert single > 0 and sum(r["weight_bytes"] for r in stats["ranks"]) == single
    assert "tokens/s total" in pipe.stderr and "busy" in pipe.stderr and "peak RSS" in pipe.stderr


def test_cli_more_ranks_than_layers_is_one_line_and_exit_2(tiny_store_path):
    r = halo("generate", "--parallel", "pipeline", "--weights", tiny_store_path, "--prompt", "x",
             ranks=3, timeout=120)
    assert r.returncode == 2, r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("halo-mpi: error:")]
    assert len(errors) == 1 and "-n 2 or fewer" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_interrupt_on_one_rank_ends_every_rank(deep_store_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(60)))
    mark = uuid.uuid4().hex
    cmd = halo_cmd("generate", "--parallel", "pipeline", "--weights", deep_store_path, "--prompt-file",
                   prompts, "--max-new-tokens", 200, "--temperature", 0.8, "--num-sequences", 3, ranks=3)
    with launched(cmd, env={**os.environ, "HALO_TEST_MARK": mark}) as proc:
        first = proc.stdout.readline()          # the ring runs: a first sequence has finished
        assert first.startswith("["), proc.stderr.read()
        pid = pid_of_rank(mark, 1)
        assert pid is not None
        os.kill(pid, signal.SIGINT)
        proc.wait(timeout=20)                   # all ranks end within seconds
    err = proc.stderr.read()
    assert proc.returncode != 0
    assert "halo-mpi: interrupted on rank 1" in err, err
