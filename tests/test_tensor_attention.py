"""Attention groups, their K/V caches and the head's vocabulary slices spread over the ranks
(the single-process twin; tests/test_tensor_mpi.py runs the same under mpiexec)."""

import numpy as np
import pytest
import torch

from halo_mpi.model.llama import Attention, Transformer
from halo_mpi.net.devices import ClusterSpec, Device
from halo_mpi.options.tree import ModeOptions
from halo_mpi.tensor.attention import HeldAttention
from halo_mpi.tensor.local import LocalCluster
from halo_mpi.tensor.placement import attention_placement, holders, vocab_slices
from halo_mpi.tensor.plan import make_plan

PROMPTS = [[5, 70, 33, 9, 120, 17, 3], [44, 2, 8]]   # two sequences: the caches start over


class Reference:
    """The single-process model behind the same step() as TensorParallelSession."""

    def __init__(self, model, max_len):
        self.model, self.cache = model, model.new_cache(max_len)

    def step(self, tokens, decoding, last_only=True):
        return self.model(tokens, self.cache, last_only=last_only)


def logits_of(session_for, prompts, steps=5):
    """Prefill each prompt in chunks of 3, then greedy decode: every logits row, (N, vocab)."""
    out = []
    with torch.inference_mode():
        for ids in prompts:
            session = session_for(len(ids) + steps)
            for start in range(0, len(ids), 3):
                logits = session.step(torch.tensor(ids[start:start + 3]), decoding=False, last_only=False)
                out.append(logits)
            for _ in range(steps):
                token = torch.tensor([int(logits[-1].argmax())])
                logits = session.step(token, decoding=True, last_only=False)
                out.append(logits)
    return torch.cat(out)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("store_name", ["tiny_store", "kv3_store"])
def test_strict_twin_equals_the_reference_at_every_size(request, store_name, size):
    store = request.getfixturevalue(store_name)
    ref_model = Transformer.from_store(store)
    ref = logits_of(lambda n: Reference(ref_model, n), PROMPTS)
    plan = make_plan(store, size, ModeOptions.of(sync="strict"))
    assert plan.members == list(range(size)) and plan.satellites == []
    cluster = LocalCluster(store, plan)
    got = logits_of(cluster.session, PROMPTS)
    done = cluster.stop()
    assert (got - ref).abs().max().item() < 1e-4
    # every weight is held once: the ranks' bytes add up to the single process's (the embedding
    # rows are read from the store, the head is held in slices), except the norms, which every
    # rank of the all-reduce keeps
    held = cluster.lead.weight_bytes + cluster.lead.model_bytes
    held += sum(s["weight_bytes"] for s in done.values())
    a = store.args
    embedding = 0 if a.tied_embeddings else ref_model.embedding.numel() * 4
    norms = (2 * a.n_layers + 1) * a.dim * 4
    assert held == ref_model.weight_bytes() - embedding + (size - 1) * norms


def cluster_of(speeds, reliability=None):
    reliability = reliability or [1.0] * len(speeds)
    return ClusterSpec([Device(speed=s, reliability=r) for s, r in zip(speeds, reliability)])


@pytest.mark.parametrize("size", [2, 3, 4])
def test_three_kv_heads_spread_over_any_number_of_ranks(size):
    cluster = cluster_of([1.0] * size)
    placed = attention_placement(cluster, 30, 3, list(range(size)))
    for layer in placed:                         # each head once per layer, on distinct ranks
        heads = np.concatenate(layer)
        assert sorted(heads.tolist()) == [0, 1, 2]
        assert max(len(h) for h in layer) == (2 if size == 2 else 1)
    counts = [sum(len(layer[r]) for layer in placed) for r in range(size)]
    assert max(counts) - min(counts) <= 1 and sum(counts) == 90


def test_halo_keeps_attention_and_head_off_unstable_ranks_and_a_replan_keeps_what_stays():
    cluster = cluster_of([1.0, 1.0, 2.0, 1.0], [1.0, 1.0, 1.0, 0.9])
    assert holders(cluster, "halo") == [0, 1, 2] and holders(cluster, "strict") == [0, 1, 2, 3]
    placed = attention_placement(cluster, 12, 3, holders(cluster, "halo"))
    counts = [sum(len(layer[r]) for layer in placed) for r in range(4)]
    assert counts[3] == 0 and counts[2] == max(counts)           # the fast rank holds the most
    vocab = vocab_slices(cluster, 1000, holders(cluster, "halo"))
    assert vocab[0][0] == 0 and vocab[-1][1] == 1000 and vocab[3] == (1000, 1000)
    assert all(a[1] == b[0] for a, b in zip(vocab, vocab[1:]))     # contiguous, in rank order
    assert vocab[2][1] - vocab[2][0] == 500
    cluster.ranks[1].reliability = 0.5                             # rank 1 turns unstable
    again = attention_placement(cluster, 12, 3, holders(cluster, "halo"), previous=placed)
    for old, new in zip(placed, again):
        assert len(new[1]) == 0
        for r in (0, 2):                                           # nothing else moves
            assert set(old[r].tolist()) <= set(new[r].tolist())
    start, stop = vocab_slices(cluster, 1000, holders(cluster, "halo"), previous=vocab)[1]
    assert start == stop                                           # its head slice moves too


def test_an_attention_input_past_the_cache_is_one_clear_error(kv3_store):
    a = kv3_store.args
    held = HeldAttention(a, lambda layer, ids: Attention(a, kv3_store.attn_groups(layer, ids), ids))
    held.regroup(0, np.array([0]))
    with pytest.raises(Exception, match="hole"):
        held.step(0, torch.randn(1, a.dim), 4)


def test_a_slow_device_is_emulated_in_the_all_reduce_too():
    import time

    from halo_mpi.tensor.exchange import ComputeClock
    clock = ComputeClock(speed=0.5)
    t0 = time.perf_counter()
    with clock:
        time.sleep(0.02)
    assert time.perf_counter() - t0 >= 0.04 and clock.seconds >= 0.04


def test_halo_prefill_does_not_wait_for_an_unstable_rank(kv3_store):
    """Rank 0 computes an unstable rank's groups itself during prefill: the prompt never waits
    on a link that may stall, and the prompt's logits stay the reference's."""
    ref_model = Transformer.from_store(kv3_store)
    ids = torch.tensor(PROMPTS[0])
    want = ref_model(ids, ref_model.new_cache(16), last_only=True)
    plan = make_plan(kv3_store, 3, ModeOptions.of(sync="halo", unstable_ranks=frozenset({2}),
                                                  wire_dtype="float32"))
    assert any(len(p[2]) for p in plan.placement)                  # rank 2 holds MLP groups
    cluster = LocalCluster(kv3_store, plan)
    got = cluster.session(16).step(ids, decoding=False)
    done = cluster.stop()
    assert done[2]["computed"] == 0 and done[1]["computed"] > 0
    assert (got - want).abs().max().item() < 1e-4
