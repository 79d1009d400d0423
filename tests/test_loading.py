"""Weights under a memory budget (halo_mpi/loading/): the residency plan, the ring of load buffers,
and every mode's output under budgets equal to the all-resident reference."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import halo, open_store, synthetic_store

from halo_mpi.errors import HaloError
from halo_mpi.loading.budget import (
    PART_PAD,
    LayerShare,
    attention_bytes,
    linear_bytes,
    mlp_bytes,
    plan_residency,
)
from halo_mpi.loading.cache import PAGE, Part, ScratchFile, WeightCache
from halo_mpi.loading.parts import budgeted_transformer, prefetching
from halo_mpi.model.groups import GroupMLP
from halo_mpi.model.jobs import Job
from halo_mpi.model.linear import Linear
from halo_mpi.model.llama import Attention, Transformer
from halo_mpi.model.qlinear import QuantLinear
from halo_mpi.model.quant import quantize
from halo_mpi.options.tree import LoadOptions, ModeOptions
from halo_mpi.options.values import Budget
from halo_mpi.pipeline.run import run_local
from halo_mpi.store.convert import convert_store
from halo_mpi.tensor.local import LocalCluster
from halo_mpi.tensor.plan import make_plan

# ---------------------------------------------------------------------------------------------
# the budget and the plan

@pytest.mark.parametrize("text, want", [
    ("150MB", (150e6, None)), ("1.5GB", (1.5e9, None)), ("800M", (800e6, None)),
    ("64MiB", (64 * 2**20, None)), ("1000", (1000.0, None)), ("50%", (None, 0.5)),
    ("100%", (None, 1.0)), (" 25 % ", (None, 0.25))])
def test_budgets_parse(text, want):
    b = Budget.parse(text)
    assert (b.bytes, b.share) == want and Budget.parse(str(b)) == b


@pytest.mark.parametrize("text", ["", "lots", "0", "0%", "-5MB", "150%", "12 parsecs", "5%%"])
def test_bad_budgets_are_one_clear_error(text):
    with pytest.raises(HaloError, match="--mem-budget"):
        Budget.parse(text)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "q8_0", "q4"])
@pytest.mark.parametrize("rows", [64, 130, 515])
def test_resident_sizes_are_known_before_anything_is_loaded(kind, rows):
    w = np.random.default_rng(0).normal(size=(rows, 96)).astype(np.float32)
    layer = (Linear(torch.from_numpy(w), {"float32": torch.float32, "bfloat16": torch.bfloat16}[kind])
             if kind in ("float32", "bfloat16") else QuantLinear(quantize(w, kind)))
    assert linear_bytes(rows, 96, kind) == layer.nbytes


def test_model_part_sizes_match_the_built_layers(kv3_store):
    a = kv3_store.args
    assert mlp_bytes(a, 3, "float32") == GroupMLP(kv3_store.mlp_groups(1, [0, 4, 5])).nbytes
    assert attention_bytes(a, 2, "float32") == Attention(a, kv3_store.attn_groups(0, [0, 2]), [0, 2]).nbytes


def shares(n_layers=4, attention=10_000, groups=8, group_bytes=5_000):
    return [LayerShare(layer, attention, groups, lambda k: k * group_bytes) for layer in range(n_layers)]


def test_the_plan_fits_the_budget_and_reads_the_fewest_bytes():
    layers = shares()                                  # 4 x (10k + 8 * 5k) = 200k, + 30k fixed
    full = plan_residency(layers, 30_000, None, 1.0)
    assert not full.streaming and full.resident == full.share == 230_000
    for budget in (200_000, 170_000, 150_000, 140_000):
        r = plan_residency(layers, 30_000, budget, None)
        assert r.resident <= budget
        # nothing that fits reads less: every split by brute force (a layer's streamed attention
        # and groups are one part, read into buffers of the largest part plus its padding)
        fits = []
        for att in (False, True):
            for s in range(9):
                part = s * 5_000 + (10_000 if att else 0)
                pinned = 4 * ((8 - s) * 5_000 + (0 if att else 10_000))
                for slots in (2, 3):
                    if part and 30_000 + pinned + slots * (part + PART_PAD) <= budget:
                        fits.append(4 * part)
        assert r.streamed == min(fits), budget


def test_a_budget_below_the_least_a_rank_needs_is_refused_with_that_least():
    # the least: 30k fixed + 2 buffers of a whole layer (50k + padding), nothing pinned
    with pytest.raises(HaloError, match=r"100.0 KB is too small for rank 2: it needs at least 139.2 KB"):
        plan_residency(shares(), 30_000, 100_000, None, where="rank 2")


def test_without_prefetch_one_buffer_suffices():
    r = plan_residency(shares(), 30_000, 90_000, None, prefetch=False)
    assert r.slots == 1 and r.resident <= 90_000
    with pytest.raises(HaloError):
        plan_residency(shares(), 30_000, 90_000, None, prefetch=True)


# ---------------------------------------------------------------------------------------------
# the ring of load buffers

def ring(tmp_path, n_parts=5, slots=3, prefetch=True, read_mbps=None, size=4096, reader="process",
         cold=False):
    """Parts of random bytes; bound[i] is the view part i is bound to (None when evicted)."""
    scratch = ScratchFile(str(tmp_path))
    cache = WeightCache(scratch, slots, prefetch, read_mbps, cold, reader=reader)
    data, bound, parts = [], {}, []
    for i in range(n_parts):
        block = np.random.default_rng(i).integers(0, 255, size + 64 * i, dtype=np.uint8)
        scratch.pad_to(PAGE)
        offset, _ = scratch.append([block])
        data.append(block)
        part = Part(f"part {i}", (i, 1), block.nbytes, offset,
                    lambda view, i=i: bound.__setitem__(i, None if view is None else view.copy()))
        cache.add(part)
        parts.append(part)
    scratch.settle(cold)
    cache.start()
    return cache, parts, data, bound


@pytest.mark.parametrize("cold", [False, True])
@pytest.mark.parametrize("prefetch, reader", [(True, "process"), (True, "thread"), (False, "-")])
def test_each_part_gets_its_own_bytes_in_order_and_after_jumps(tmp_path, prefetch, reader, cold):
    cache, parts, data, bound = ring(tmp_path, prefetch=prefetch, reader=reader if prefetch else "process",
                                     cold=cold)
    order = [0, 1, 2, 3, 4] * 3 + [1, 4, 0, 0, 2] + [0, 1, 2, 3, 4]     # jumps: steps skipped
    for i in order:
        assert cache.acquire(parts[i])
        assert np.array_equal(bound[i], data[i]), i
        loaded = [j for j, v in bound.items() if v is not None]
        assert len(loaded) <= cache.slots
    cache.close()
    assert cache.stats.passed > 0 and cache.stats.late == 0
    assert cache.stats.bytes_read >= sum(d.nbytes for d in data) * 3


def compute_until_the_next_part_is_read(cache, timeout: float = 120.0) -> bool:
    """Stands for a layer's compute that lasts longer than a read: it ends once the reader has
    loaded the next position (or at once when nothing reads in the background). Waiting for that
    condition, not sleeping a fixed time, keeps the test's outcome independent of the machine's
    load; the timeout only guards against a hang."""
    if cache.reader is None:
        return False
    end = time.monotonic() + timeout
    while cache.cursor + 1 not in cache.ready and time.monotonic() < end:
        cache._collect(0.05)
    return cache.cursor + 1 in cache.ready


@pytest.mark.parametrize("reader", ["process", "thread"])
def test_prefetch_hides_reads_behind_compute(tmp_path, reader):
    """Counted, not timed: with prefetch, the reads of the next parts happen during compute, so
    every acquire after the first finds its part loaded (a hit, no time blocked); reading on use,
    every acquire waits for its own read."""
    acquires = 3 * 4
    for prefetch in (True, False):
        cache, parts, data, bound = ring(tmp_path, n_parts=4, prefetch=prefetch, reader=reader,
                                         read_mbps=0.2, size=4096)      # reads of ~21 ms
        blocked_after_first = []
        for k in range(acquires):
            before = cache.stats.blocked_s
            assert cache.acquire(parts[k % 4])
            assert np.array_equal(bound[k % 4], data[k % 4])
            if k:
                blocked_after_first.append(cache.stats.blocked_s - before)
            assert compute_until_the_next_part_is_read(cache) == prefetch
        if prefetch:
            assert (cache.stats.hits, cache.stats.waits) == (acquires - 1, 1), cache.stats
            assert max(blocked_after_first) == 0.0
        else:
            assert (cache.stats.hits, cache.stats.waits) == (0, acquires), cache.stats
            assert min(blocked_after_first) > 0
        cache.close()


def test_halo_skips_a_part_that_is_late_strict_waits(tmp_path):
    # the thread reader, whose pace can change on the fly (the process reader's is fixed at start)
    cache, parts, data, bound = ring(tmp_path, n_parts=3, slots=2, reader="thread")
    for _ in range(4):                               # fast reads: the grace is ~5 ms
        for p in parts:
            assert cache.acquire(p, skippable=True)
    cache.reader.read_mbps = 0.02                    # then the disk stalls: ~200 ms a read
    assert cache.acquire(parts[0])                   # strict: waited for, however long
    assert not cache.acquire(parts[1], skippable=True)
    assert cache.stats.late == 1 and bound.get(1) is None
    assert cache.acquire(parts[2]) and np.array_equal(bound[2], data[2])    # strict: waits
    cache.close()


@pytest.mark.parametrize("reader", ["process", "thread"])
def test_a_reader_failure_reaches_the_waiting_compute(tmp_path, reader):
    cache, parts, _, _ = ring(tmp_path, n_parts=3, slots=2, read_mbps=0.05, reader=reader)
    if reader == "process":
        cache.reader.proc.kill()                     # the reader process dies
    else:
        cache.scratch.close()                        # reads now fail (bad file descriptor)
    with pytest.raises(HaloError, match="weight (loader stopped|reader process ended)"):
        for _ in range(3):
            for p in parts:
                cache.acquire(p)
    cache.close()


# ---------------------------------------------------------------------------------------------
# every mode under budgets equals the reference

IDS = [5, 70, 33, 9, 120, 7]


@pytest.fixture(scope="module")
def deep_store(tmp_path_factory):
    """8 layers: enough parts that a third of the weights can hold the head and two buffers (this
    file's own, with 8 MLP groups, in place of conftest's deep_store of 4)."""
    yield from open_store(synthetic_store(tmp_path_factory, "tiny-8l", mlp_groups=8, seed=4))


def logits_of(model, ids=IDS):
    with torch.inference_mode():
        cache = model.new_cache(len(ids) + 2)
        out = model(torch.tensor(ids), cache)
        return torch.cat([out, model(torch.tensor([11]), cache)])


@pytest.mark.parametrize("budget", ["100%", "50%", "35%"])
def test_one_process_under_a_budget_equals_the_reference(deep_store, tmp_path, budget):
    ref = logits_of(Transformer.from_store(deep_store))
    model, weights = budgeted_transformer(deep_store, LoadOptions(Budget.parse(budget), str(tmp_path)))
    got = logits_of(model)
    stats = weights.stats()
    weights.close()
    assert (got - ref).abs().max() < 1e-3
    assert stats["resident_bytes"] <= stats["budget_bytes"]
    assert (budget == "100%") == ("reads" not in stats)
    if budget != "100%":
        assert stats["bytes_read"] > 0 and stats["late"] == 0


@pytest.fixture(scope="module")
def q4_store(deep_store, tmp_path_factory):
    path = tmp_path_factory.mktemp("q4") / "q4.h5"
    convert_store(deep_store.path, str(path), "q4", progress=False)
    yield from open_store(path)


def test_a_quantized_store_under_a_budget_equals_its_reference(q4_store, tmp_path):
    QuantLinear.exact = True
    try:
        ref = logits_of(Transformer.from_store(q4_store))
        model, weights = budgeted_transformer(q4_store, LoadOptions(Budget.parse("40%"), str(tmp_path)))
        got = logits_of(model)
        weights.close()
    finally:
        QuantLinear.exact = False
    assert weights.residency.streaming and (got - ref).abs().max() < 1e-3


@pytest.mark.parametrize("store, ranks, budget", [("deep", 2, "50%"), ("deep", 3, "40%"),
                                                  ("kv3", 3, "75%")])
@pytest.mark.parametrize("sync", ["strict", "halo"])
def test_tensor_mode_under_a_budget_equals_the_reference(request, tmp_path, store, ranks, budget, sync):
    store = request.getfixturevalue(f"{store}_store")
    ref_model = Transformer.from_store(store)
    ref = ref_model(torch.tensor(IDS), ref_model.new_cache(8))
    o = ModeOptions.of(parallel="tensor", sync=sync, wire_dtype="float32", mem_budget=Budget.parse(budget),
                       load_dir=str(tmp_path))
    cluster = LocalCluster(store, make_plan(store, ranks, o))
    got = cluster.session(8).step(torch.tensor(IDS), decoding=False, last_only=False)
    loading = cluster.lead.loading.stats()
    workers = cluster.stop()
    assert (got - ref).abs().max().item() < 1e-3
    for stats in [loading] + [w["loading"] for w in workers.values()]:
        assert stats["resident_bytes"] <= stats["budget_bytes"]
        assert stats["late"] == 0              # no storage stall here: nothing skipped, even in HALO


@pytest.mark.parametrize("budget, room", [("90%", True), ("40%", False)])
@pytest.mark.parametrize("drop_budget", [1.0, 0.05])
def test_replans_under_a_budget_read_into_the_room_kept_for_them(deep_store, tmp_path, budget, room,
                                                                  drop_budget):
    """HALO under --mem-budget: satellite 2 turns late mid-sequence, then clean again. With room
    in the budgets, the members read the groups it loses resident beside the ones the loader laid
    out (within the room each budget kept), every rank switches at one step, and when the link
    recovers rank 2 computes its own groups again without reading any; the logits stay the
    reference's throughout (every partial waited for) and no rank's weights pass its budget.
    Where a budget keeps too little room, the re-plan is not made and said so."""
    from halo_mpi.net.links import LinkEstimate
    ids = [5, 70, 33, 9, 120, 17, 3, 44, 8, 2]
    ref_model = Transformer.from_store(deep_store)
    ref_cache = ref_model.new_cache(16)
    o = ModeOptions.of(parallel="tensor", sync="halo", unstable_ranks=frozenset({2}), critical_share=1.0,
                       wire_dtype="float32", drop_budget=drop_budget, mem_budget=Budget.parse(budget),
                       load_dir=str(tmp_path))
    plan = make_plan(deep_store, 3, o)
    assert plan.replan and plan.reserve[0] > 0 and plan.reserve[2] == 0
    cluster = LocalCluster(deep_store, plan)
    planner = cluster.lead.planner
    start = [p.copy() for p in planner.placement]
    session = cluster.session(16)
    with torch.inference_mode():
        for i, token in enumerate(ids):
            if i in (3, 7):            # rank 2 turns late (on time 1 in 4), then clean again
                link = LinkEstimate()
                for k in range(40 if i == 3 else 300):
                    link.add_outcome(i == 7 or k % 4 == 0)
                planner.maybe_replan({2: link})
            # (not decoding: re-plans come from the links given here only, not from the measured ones)
            got = session.step(torch.tensor([token]), decoding=False)
            want = ref_model(torch.tensor([token]), ref_cache, last_only=True)
            assert (got - want).abs().max().item() < 1e-4, i
            if i == 5 and room:        # the first plan is in place: rank 2 holds less
                assert planner.version == 1
                assert sum(len(p[2]) for p in planner.placement) < sum(len(p[2]) for p in start)
    lead = cluster.lead.loading.stats() | {"replan_bytes": cluster.lead.groups.extra_bytes}
    workers = cluster.stop()
    stats = {0: lead, **{r: w["loading"] for r, w in workers.items()}}
    for s in stats.values():
        assert s["resident_bytes"] + s["reserve_bytes"] <= s["budget_bytes"]
        assert s["replan_bytes"] <= s["reserve_bytes"]
    assert any(s["bytes_read"] > 0 for s in stats.values())      # the budgets stream
    if room:
        assert planner.version == 2 and planner.pending is None, planner.replans
        assert sum("in place from step" in line for line in planner.replans) == 2
        assert stats[0]["replan_bytes"] > 0
        assert stats[2]["replan_bytes"] == 0 and workers[2]["plans"] == 2   # its own groups back
        assert workers[2]["groups"] == sum(len(p[2]) for p in start)
    else:
        assert planner.version == 0
        assert "not made: rank 0 would hold" in planner.replans[0], planner.replans
        assert all(s["replan_bytes"] == 0 for s in stats.values())


def test_pipeline_under_a_budget_equals_the_reference(deep_store, tmp_path):
    from test_pipeline import assert_same_as_reference
    requests = [Job([5, 70, 33, 9, 120], 5, index=0), Job([7, 8, 1], 4, index=1)]
    o = ModeOptions.of(parallel="pipeline", num_sequences=2, mem_budget=Budget.parse("60%"),
                       load_dir=str(tmp_path))
    run = run_local(deep_store, requests, o, 2, keep_logits=True)
    assert_same_as_reference(run, Transformer.from_store(deep_store), requests)
    assert all(r["loading"]["bytes_read"] > 0 for r in run.ranks)


# ---------------------------------------------------------------------------------------------
# memory, in a process of its own

RSS_SCRIPT = """
import json, sys, torch
from halo_mpi.stats import rss_mb, peak_rss_mb
from halo_mpi.store.hdf5 import Store
from halo_mpi.loading.parts import budgeted_transformer
from halo_mpi.options.tree import LoadOptions
from halo_mpi.options.values import Budget
store = Store(sys.argv[1])
model, weights = budgeted_transformer(store, LoadOptions(Budget.parse(sys.argv[2]), sys.argv[3]))
cache = model.new_cache(64)
with torch.inference_mode():
    model(torch.arange(8), cache)
    for t in range(16):
        model(torch.tensor([t]), cache)
s = weights.stats()
weights.close()
print(json.dumps(dict(s, peak_rss_mb=peak_rss_mb())))
"""


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """The SmolLM2 shape with random weights (538 MB in float32)."""
    return synthetic_store(tmp_path_factory, "smollm2-135m", seed=2)


@pytest.mark.parametrize("budget", ["30%", "50%"])
def test_peak_rss_stays_within_the_budget_plus_the_process_without_weights(big_store, tmp_path, budget):
    import json
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(big_store), budget, str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    s = json.loads(done.stdout)
    # overhead beside the budget: the process before any weight, plus 10% of the budget and 25 MB
    # for the build's arrays, the KV cache and activations (measured: 14 MB at 50% of SmolLM2)
    allowed = s["rss_before_weights_mb"] + 1.1 * s["budget_bytes"] / 1e6 + 25
    assert s["peak_rss_mb"] <= allowed, s


def test_a_budget_too_small_fails_at_once_before_any_weight_is_read(tiny_store_path):
    """Before any work: one line, nothing generated, no loading report (not a wall-time bound,
    which a busy machine could break; the timeout only guards against a hang)."""
    done = halo("generate", "--weights", tiny_store_path, "--prompt", "hi", "--mem-budget", "2KB",
                timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "too small for this rank: it needs at least" in lines[0], done.stderr
    assert done.stdout == "" and "loading:" not in done.stderr


def test_a_load_dir_that_cannot_be_written_is_one_line(deep_store, tmp_path):
    done = halo("generate", "--weights", deep_store.path, "--prompt", "hi", "--mem-budget", "50%",
                "--load-dir", tmp_path / "no" / "such", timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "cannot create the load scratch file" in lines[0] and "--load-dir" in lines[0]


def test_the_scratch_file_leaves_nothing_behind(deep_store, tmp_path):
    done = halo("generate", "--weights", deep_store.path, "--prompt", "hi there", "--mem-budget", "50%",
                "--load-dir", tmp_path, "--max-new-tokens", 4, "--temperature", 0, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "loading:" in done.stderr and "MB read per token" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_readers_end_with_their_cache(tmp_path):
    before = threading.active_count()
    cache, parts, _, _ = ring(tmp_path, reader="thread")
    assert threading.active_count() == before + 1
    cache.close()
    assert threading.active_count() == before
    cache, parts, _, _ = ring(tmp_path, reader="process")
    proc = cache.reader.proc
    cache.acquire(parts[0])
    cache.close()
    assert proc.poll() == 0 and cache.reader_rss_mb > 0


def test_auto_prefetch_reads_ahead_when_reads_wait_on_the_disk_or_a_core_is_free():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        half = Budget.parse("50%")
        assert not prefetching(LoadOptions(half))                 # one core, page cache: off
        assert prefetching(LoadOptions(half, cold=True))          # the disk's DMA: on
        assert prefetching(LoadOptions(half, prefetch="on"))
        torch.set_num_threads(2)
        assert prefetching(LoadOptions(half))                     # a core for the reader
        assert not prefetching(LoadOptions(half, prefetch="off"))
    finally:
        torch.set_num_threads(threads)
