"""Pipeline mode's batching: a stage runs the sequences waiting at it in one ragged step, rank 0
its head over the sequences that came home together; each sequence's tokens and logits equal its
run alone (the reference, and the unbatched ring).

    .venv/bin/python -m pytest -m "not mpi" tests/test_pipeline_batch.py
    .venv/bin/python tests/mpi_run.py 2 -q -m mpi tests/test_pipeline_batch.py
"""
import dataclasses
from collections import deque

import numpy as np
import pytest
import torch
from test_pipeline import LOGIT_TOL, assert_same_as_reference, make_requests, mpi_run, ring_options

from halo_mpi.model.llama import Transformer
from halo_mpi.net.framing import Kind, Message
from halo_mpi.pipeline.plan import load_stage_model, make_plan
from halo_mpi.pipeline.run import run_local
from halo_mpi.pipeline.stage import Feed, Stage, take_step


@pytest.fixture(scope="module")
def deep_model(deep_store):
    return Transformer.from_store(deep_store)


# ---------------------------------------------------------------------------------------------
# which messages a step takes (serial)

def activation(seq: int, rows: int, kind=None, step: int = 0) -> Message:
    return Message(0, kind or Kind.ACTIVATION, step, 0, np.zeros((rows, 4), np.float32), 0.0, seq)


def test_a_step_takes_one_message_per_sequence_up_to_max_batch():
    waiting = deque([activation(1, 1), activation(1, 1, step=1), activation(2, 1), activation(3, 1),
                     activation(4, 1)])
    taken = take_step(waiting, max_batch=3, prefill_rows=64)
    assert [(m.seq, m.step) for m in taken] == [(1, 0), (2, 0), (3, 0)]
    assert [(m.seq, m.step) for m in waiting] == [(1, 1), (4, 0)]      # order kept for the next step
    assert [(m.seq, m.step) for m in take_step(waiting, 3, 64)] == [(1, 1), (4, 0)] and not waiting


def test_a_step_caps_prompt_rows_and_stops_at_stop():
    waiting = deque([activation(1, 40), activation(2, 1), activation(3, 40), activation(4, 20),
                     activation(5, 0), activation(6, 1), activation(0, 0, Kind.STOP), activation(7, 1)])
    taken = take_step(waiting, max_batch=8, prefill_rows=64)
    # the first prompt chunk always goes; a second only while the chunks' rows fit in 64; a
    # finished sequence's empty message does not count; nothing past STOP
    assert [m.seq for m in taken] == [1, 2, 4, 5, 6]
    assert [m.seq for m in waiting] == [3, 0, 7] and waiting[1].kind == Kind.STOP


# ---------------------------------------------------------------------------------------------
# a stage, and the ring as threads of one process

def test_a_stage_runs_several_sequences_as_each_alone(deep_store):
    """Stage.run over three sequences (a prompt chunk, two decode rows) in one ragged step gives
    each the rows it gets run alone, and leaves each cache where running alone does."""
    o = ring_options(max_batch=8)
    plan = make_plan(deep_store.args, make_requests(3, 512), 2, o)
    model, _ = load_stage_model(deep_store, plan, 1, o)
    batched, alone = Stage(model, 1, plan), Stage(model, 1, plan)
    torch.manual_seed(0)
    prompts = {seq: torch.randn(n, plan.dim) for seq, n in [(0, 5), (1, 3), (2, 7)]}
    for stage in (batched, alone):
        for seq in (0, 1):
            stage.run([Feed(seq, 0, prompts[seq], (len(prompts[seq]), 32))])
    feeds = [Feed(2, 0, prompts[2], (7, 32)), Feed(0, 5, torch.randn(1, plan.dim), (5, 32)),
             Feed(1, 3, torch.randn(1, plan.dim), (3, 32))]
    together = batched.run(feeds)
    for feed, got in zip(feeds, together):
        want = alone.run([feed])[0]
        assert got.shape == want.shape and float((got - want).abs().max()) < 1e-4, feed.seq
        assert batched.caches[feed.seq].pos == alone.caches[feed.seq].pos == feed.step + len(feed.h)
    assert batched.steps.by_batch[3] == 1


def test_one_sequence_in_flight_is_never_batched_nor_packed(deep_store, deep_model):
    requests = make_requests(3, deep_store.args.vocab_size, seed=9)
    run = run_local(deep_store, requests, ring_options(num_sequences=1, max_batch=8), 2, keep_logits=True)
    assert_same_as_reference(run, deep_model, requests)
    assert all(r["max_batch"] == 1 and r["packed_bytes"] == 0 for r in run.ranks)


def steps_with_several(run) -> list[int]:
    """Per rank: the steps that carried more than one sequence."""
    return [sum(n for b, n in r["steps_by_batch"].items() if int(b) > 1) for r in run.ranks]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_batched_ring_gives_each_sequence_what_it_gets_alone(deep_store, deep_model, size):
    """8 sequences in flight, stages batching up to 4: the same tokens and logits as the
    reference and as the unbatched ring (--max-batch 1), and every rank did batch."""
    requests = make_requests(8, deep_store.args.vocab_size, seed=40 + size)
    o = ring_options(num_sequences=8, prefill_chunk=16)
    batched = run_local(deep_store, requests, dataclasses.replace(o, max_batch=4), size, keep_logits=True)
    single = run_local(deep_store, requests, dataclasses.replace(o, max_batch=1), size, keep_logits=True)
    assert_same_as_reference(batched, deep_model, requests)
    for a, b in zip(batched.sequences, single.sequences):
        assert a.result.tokens == b.result.tokens
        assert max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits)) < LOGIT_TOL
    assert steps_with_several(batched)[0] > 0, batched.ranks
    assert all(max(map(int, r["steps_by_batch"])) <= 4 for r in batched.ranks)
    assert steps_with_several(single) == [0] * size
    assert batched.pending_requests == 0


def test_a_streamed_attention_runs_one_sequence_a_step(deep_store, deep_model, tmp_path):
    """Under a memory budget that streams the attention a stage has no ragged path: max_batch 1
    there (rank 0 at 60% of the tiny model, where the head takes much of its share), the other
    stage still batches (only its MLP streamed; up to the 4 in flight), the ring still exact."""
    from halo_mpi.options.values import Budget
    requests = make_requests(4, deep_store.args.vocab_size, seed=3)
    o = ring_options(num_sequences=4, max_batch=8, mem_budget=Budget.parse("60%"), load_dir=str(tmp_path))
    run = run_local(deep_store, requests, o, 2, keep_logits=True)
    assert_same_as_reference(run, deep_model, requests)
    assert [r["max_batch"] for r in run.ranks] == [1, 4] and steps_with_several(run)[0] == 0
    assert all(r["packed_bytes"] == 0 for r in run.ranks)       # streamed weights are never packed


# ---------------------------------------------------------------------------------------------
# under mpiexec (tests/mpi_run.py 2 -q -m mpi tests/test_pipeline_batch.py)

@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_mpi_batched_ring_equals_the_reference(deep_store_path, deep_model, max_batch):
    from mpi4py import MPI
    requests = make_requests(9, 512, seed=60 + max_batch)
    run = mpi_run(deep_store_path, requests, ring_options(num_sequences=8, max_batch=max_batch,
                                                          prefill_chunk=8))
    if MPI.COMM_WORLD.rank != 0:
        assert run is None
        return
    assert_same_as_reference(run, deep_model, requests)
    assert run.pending_requests == 0
    # whether a stage finds several sequences waiting is timing (a tiny model's step is quicker
    # than a message): rank 0 always does, its joining prompts' chunks going beside decode rows
    several = steps_with_several(run)
    assert (several[0] > 0 if max_batch > 1 else several == [0] * len(run.ranks)), run.ranks
    assert all(max(map(int, r["steps_by_batch"])) <= max_batch for r in run.ranks)


@pytest.mark.slow
def test_batched_ring_of_the_real_model_equals_the_reference(real_store_path):
    """SmolLM2 (float32, packed for oneDNN on every stage), -n 2 as threads, 6 sequences with up to
    4 a step: each one's tokens and logits as the single-process reference."""
    from test_pipeline import jobs_of

    from halo_mpi.model.tokenizer import Tokenizer
    from halo_mpi.store.hdf5 import Store
    with Store(str(real_store_path)) as store:
        tok = Tokenizer.from_store(store)
        prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
                   "The sky is blue because", "1, 2, 3, 4,", "In the beginning"]
        requests = jobs_of([(tok.encode(p), 6) for p in prompts])
        run = run_local(store, requests, ring_options(num_sequences=6, max_batch=4, prefill_chunk=4), 2,
                        keep_logits=True)
        model = Transformer.from_store(store)
    assert_same_as_reference(run, model, requests)
    assert steps_with_several(run)[0] > 0 and run.ranks[0]["packed_bytes"] > 0
