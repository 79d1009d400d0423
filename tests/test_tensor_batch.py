"""Batched decode in tensor mode (the thread twin): several sequences per step, every round of
the step carrying all their rows, each sequence's attention caches in its own slot on every
member; strict and HALO sync, a member demoted in the middle of a batch (every running sequence
replayed), and the engine's continuous batching against the single process.

Tolerance as tests/test_batch.py's (summation order only: float32 wire, every partial waited for).
"""
import pytest
import torch

from halo_mpi.model.jobs import Job, JobList
from halo_mpi.model.llama import Transformer
from halo_mpi.modes.single import SingleEngine
from halo_mpi.modes.tensor import TensorEngine
from halo_mpi.options.tree import ModeOptions
from halo_mpi.tensor.lead import TensorBatch
from halo_mpi.tensor.local import LocalCluster
from halo_mpi.tensor.plan import make_plan
from halo_mpi.tensor.slots import pack_feeds, unpack_feeds

TOL = {"atol": 1e-3, "rtol": 1e-5}
PROMPTS = [[5, 70, 33, 9, 120, 17], [7, 8, 1], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53]]
THEN = [[3, 4, 5, 6, 7], [9, 10], [11, 12]]
# (sequence, its ids) per step: 0 and 1 start together; 2 joins at step 2 with its prompt in
# chunks of 5 while the others decode; 1 leaves after step 2
SCHEDULE = [[(0, PROMPTS[0]), (1, PROMPTS[1])],
            [(0, [3]), (1, [9])],
            [(0, [4]), (1, [10]), (2, PROMPTS[2][:5])],
            [(0, [5]), (2, PROMPTS[2][5:10])],
            [(2, PROMPTS[2][10:]), (0, [6])],
            [(0, [7]), (2, [11])],
            [(2, [12])]]


def alone(model: Transformer, ids: list[int], then: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt, then after each token of `then`, the sequence alone."""
    cache = model.new_cache(len(ids) + len(then))
    out = [model(torch.tensor(ids), cache, last_only=True)[0]]
    out += [model(torch.tensor([t]), cache, last_only=True)[0] for t in then]
    return out


def run_schedule(batch, schedule=SCHEDULE, before_step=None) -> list[list[torch.Tensor]]:
    """Each sequence's logits after its prompt and each of its tokens, the steps as scheduled
    through a BatchModel; a sequence's state closed after its last step."""
    states, fed, got = {}, {}, {i: [] for i in range(len(PROMPTS))}
    last = {i: k for k, step in enumerate(schedule) for i, _ in step}     # each one's last step
    for k, step in enumerate(schedule):
        if before_step is not None:
            before_step(k)
        for i, _ in step:
            if i not in states:
                states[i], fed[i] = batch.open(32), 0
        logits = batch.step([(states[i], ids) for i, ids in step])
        for (i, ids), row in zip(step, logits):
            fed[i] += len(ids)
            if fed[i] >= len(PROMPTS[i]):
                got[i].append(row)
            if k == last[i]:
                batch.close(states.pop(i))
    return [got[i] for i in range(len(PROMPTS))]


def check(store, got):
    model = Transformer.from_store(store)
    for i, (prompt, then) in enumerate(zip(PROMPTS, THEN)):
        want = alone(model, prompt, then)
        assert len(got[i]) == len(want), i
        for g, w in zip(got[i], want):
            torch.testing.assert_close(g, w, **TOL)


def test_feeds_go_through_a_step_message_whole():
    feeds = [(3, 17, [5, 6, 7]), (0, 0, [9]), (7, 2, list(range(20)))]
    back = unpack_feeds(pack_feeds(feeds))
    assert [(s, p, ids.tolist()) for s, p, ids in back] == feeds


@pytest.mark.parametrize("sync,unstable", [("strict", frozenset()), ("halo", frozenset()),
                                            ("halo", frozenset({2}))])
def test_a_batched_step_in_tensor_mode_equals_each_sequence_alone(kv3_store, sync, unstable):
    """3 ranks (attention spread over them; with rank 2 unstable, a satellite asked for its MLP
    partials in decode steps: every partial waited for, critical share 1)."""
    o = ModeOptions.of(sync=sync, unstable_ranks=unstable, critical_share=1.0, wire_dtype="float32",
                       drop_budget=1.0)           # rank 2 keeps its full share (not a probe)
    plan = make_plan(kv3_store, 3, o)
    cluster = LocalCluster(kv3_store, plan)
    with torch.inference_mode():
        got = run_schedule(TensorBatch(cluster.model, cluster.lead, 4))
    workers = cluster.stop()
    check(kv3_store, got)
    if unstable:
        assert plan.satellites == [2] and workers[2]["computed"] > 0    # asked in the decode steps


def test_a_member_demoted_in_a_batch_leaves_every_sequence_the_reference(kv3_store):
    """Rank 2's rounds turn late while three sequences run: it is demoted, rank 0 replays every
    running sequence (their own slots) to refill the moved attention groups' caches, and every
    sequence's logits stay the reference's."""
    o = ModeOptions.of(sync="halo", critical_share=1.0, wire_dtype="float32", prefill_chunk=4)
    plan = make_plan(kv3_store, 3, o)
    assert plan.members == [0, 1, 2] and any(len(p[2]) for p in plan.attention)
    cluster = LocalCluster(kv3_store, plan)
    planner, lead = cluster.lead.planner, cluster.lead

    def late_at_step_3(k):
        if k == 3:
            for j in range(40):
                planner.roles.links[2].add_outcome(j % 3 == 0)

    with torch.inference_mode():
        got = run_schedule(TensorBatch(cluster.model, lead, 4), before_step=late_at_step_3)
    workers = cluster.stop()
    check(kv3_store, got)
    assert lead.members == [0, 1] and workers[2].get("demoted")
    step, positions = lead.replays[0]
    assert positions == len(PROMPTS[0]) + 4 + len(PROMPTS[2][:5])       # sequences 0 and 2 so far


def test_the_tensor_engine_batches_generate_like_the_single_process(tiny_store_path):
    """generate's jobs through the engine's continuous batching (3 ranks as threads, 2 sequences
    a step at most): each greedy text equals the single process's, one sequence at a time."""
    def jobs():
        return JobList([Job(p, 6, index=i) for i, p in enumerate(PROMPTS)])

    with SingleEngine(ModeOptions.of(weights=str(tiny_store_path), max_batch=1)) as single:
        want = {job.index: job.result.tokens for job in single.generate(jobs())}
    o = ModeOptions.of(weights=str(tiny_store_path), parallel="tensor", max_batch=2, wire_dtype="float32")
    with TensorEngine(o, local_ranks=3) as engine:
        assert engine.max_batch == 2
        got = {job.index: job.result.tokens for job in engine.generate(jobs())}
        batches = list(engine.batcher.steps.batch)
    assert got == want
    assert max(batches) == 2


def test_a_text_scored_as_batched_sequences_equals_each_part_alone(tiny_store_path):
    """evaluate --sequences 3 in tensor mode (3 ranks as threads): the parts' values equal each
    part scored alone by the single process."""
    from halo_mpi.model.evaluate import split_text, teacher_forced_nll
    from halo_mpi.model.generate import LocalSession
    from halo_mpi.store.hdf5 import Store
    ids = [5, 70, 33, 9, 120, 17, 3, 44, 8, 61, 7, 19, 23, 2, 90, 91]
    with Store(str(tiny_store_path)) as store:
        model = Transformer.from_store(store)
        want = [v for part in split_text(ids, 3) for v in teacher_forced_nll(LocalSession(model, 8), part)]
    o = ModeOptions.of(weights=str(tiny_store_path), parallel="tensor", wire_dtype="float32")
    with TensorEngine(o, local_ranks=3) as engine:
        got = engine.perplexity(ids, sequences=3)
    assert len(got) == len(ids) - 3
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


def test_weights_are_packed_once_and_a_re_plans_pieces_too(kv3_store):
    """Packing for batched steps happens once (with bfloat16 compute nothing is packed: it must
    not be tried again every step), and a layer made of a re-plan's pieces packs like one."""
    from halo_mpi.tensor.held import Pieces
    plan = make_plan(kv3_store, 2, ModeOptions.of(sync="strict", dtype="bfloat16"))
    cluster = LocalCluster(kv3_store, plan)
    lead = cluster.lead
    with torch.inference_mode():
        run_schedule(TensorBatch(cluster.model, lead, 4), SCHEDULE[:2])
    assert lead.packed and lead.packed_bytes == 0
    cluster.stop()
    plan = make_plan(kv3_store, 2, ModeOptions.of(sync="strict"))
    cluster = LocalCluster(kv3_store, plan)
    lead = cluster.lead
    lead.groups.mlps[0] = Pieces([lead.groups.mlps[0]])
    lead.pack_for_batches()
    cluster.stop()
    assert lead.packed_bytes > 0 and all(lin.packed is not None for lin in lead.groups.mlps[0].linears())
