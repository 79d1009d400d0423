"""The mode layer (halo_mpi/modes/): every mode opened by one call, in one process (the parallel
modes' ranks as threads), answers like the single-process reference (3 layers, 3 KV heads);
evaluate in every mode and under a memory budget; its errors said once under mpiexec."""
import json

import pytest
import torch

try:
    from conftest import halo
except ImportError:  # (helper in progress)
    halo = None

from halo_mpi.model.evaluate import teacher_forced_nll
from halo_mpi.model.generate import LocalSession, Sampler, generate
from halo_mpi.model.jobs import Job, JobList
from halo_mpi.model.llama import Transformer
from halo_mpi.modes.engine import Workload
from halo_mpi.modes.open import open_engine
from halo_mpi.options.tree import ModeOptions
from halo_mpi.options.values import Budget

PROMPTS = [[5, 70, 33, 9, 120, 17], [7, 8, 1]]
SCORED = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79]
NEW = 10

MODES = [
    ("none", 1, {}),                        # batched: --max-batch 8 by default
    ("none", 1, {"max_batch": 1}),          # one sequence at a time
    ("tensor", 2, {"sync": "strict"}),
    ("tensor", 3, {"sync": "strict", "wire_dtype": "float32"}),
    ("tensor", 3, {"sync": "halo", "wire_dtype": "float32", "critical_share": 1.0}),
    ("tensor", 3, {"sync": "strict", "mem_budget": Budget.parse("75%")}),
    ("pipeline", 2, {}),
    ("pipeline", 3, {"num_sequences": 1}),
]


@pytest.fixture(scope="module")
def reference(kv3_store):
    model = Transformer.from_store(kv3_store)
    with torch.inference_mode():
        tokens = [generate(LocalSession(model, len(p) + NEW), p, NEW, Sampler(0.0)).tokens for p in PROMPTS]
        nll = teacher_forced_nll(LocalSession(model, len(SCORED)), SCORED)
    return tokens, nll


def workload(tok, context: int) -> Workload:
    return Workload(jobs=[Job(p, NEW, index=i) for i, p in enumerate(PROMPTS)], score=SCORED)


@pytest.mark.parametrize("parallel, ranks, fields", MODES, ids=[f"{p}-{n}-{f}" for p, n, f in MODES])
def test_every_mode_generates_like_the_reference(kv3_store, reference, tmp_path, parallel, ranks, fields):
    fields = {**fields, "load_dir": str(tmp_path)} if "mem_budget" in fields else fields
    options = ModeOptions.of(parallel=parallel, weights=kv3_store.path, prefill_chunk=4, **fields)
    finished = []
    with open_engine(options, prepare=workload, local_ranks=ranks) as engine:
        assert engine.mode == {"none": "single"}.get(parallel, parallel) and engine.size == ranks
        jobs = engine.generate(on_finish=finished.append)
        report = engine.report()
    assert [job.result.tokens for job in sorted(jobs, key=lambda j: j.index)] == reference[0]
    assert sorted(job.index for job in finished) == [0, 1]
    stats = report.stats.as_json()
    assert stats["ranks_total"] == ranks and stats["tokens"] == 2 * NEW and report.error is None
    assert stats["pending_requests_at_end"] == 0 and report.lines


@pytest.mark.parametrize("parallel, ranks, fields", MODES, ids=[f"{p}-{n}-{f}" for p, n, f in MODES])
def test_every_mode_scores_like_the_reference(kv3_store, reference, tmp_path, parallel, ranks, fields):
    fields = {**fields, "load_dir": str(tmp_path)} if "mem_budget" in fields else fields
    options = ModeOptions.of(parallel=parallel, weights=kv3_store.path, **fields)
    with open_engine(options, prepare=workload, local_ranks=ranks) as engine:
        nll = engine.perplexity()
    assert nll == pytest.approx(reference[1], abs=1e-4)


def test_jobs_from_a_source_stop_when_asked(kv3_store, reference):
    """A job's on_token can end it (a stop string, a client gone); a cancelled job never starts."""
    seen = []
    jobs = [Job(PROMPTS[0], NEW, index=0, on_token=lambda t: seen.append(t) or len(seen) == 3),
            Job(PROMPTS[1], NEW, index=1, cancelled=lambda: True)]
    options = ModeOptions.of(parallel="pipeline", weights=kv3_store.path)
    with open_engine(options, local_ranks=2) as engine:
        done = engine.generate(JobList(jobs))
    by_index = {job.index: job.result for job in done}
    assert by_index[0].tokens == reference[0][0][:3] and by_index[0].stopped_by == "stop"
    assert by_index[1].stopped_by == "cancelled" and by_index[1].tokens == []


def test_evaluate_under_a_memory_budget_equals_evaluate_without(deep_store_path, tmp_path):
    full = halo("evaluate", "--weights", deep_store_path, "--tokens", 24, "--json", tmp_path / "a.json")
    budget = halo("evaluate", "--weights", deep_store_path, "--tokens", 24, "--mem-budget", "50%",
                  "--load-dir", tmp_path, "--json", tmp_path / "b.json")
    assert full.returncode == 0 and budget.returncode == 0, full.stderr + budget.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5) and a["tokens"] == 24
    assert "memory: budget" in budget.stderr


@pytest.mark.parametrize("args, says", [
    (["evaluate"], "choose --parallel tensor or --parallel pipeline"),
    (["evaluate", "--parallel", "tensor", "--link-loss", "5:0.1"], "names rank 5"),
    (["evaluate", "--parallel", "tensor", "--mem-budget", "1KB"], "is too small for rank"),
])
def test_evaluate_mode_errors_are_one_line_under_mpiexec(tiny_store_path, args, says):
    done = halo(*args, "--weights", tiny_store_path, ranks=2, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr
