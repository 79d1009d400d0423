"""The reference model: KV-cache consistency, group decomposition, and equality with transformers."""
import os

import pytest
import torch

from halo_mpi.model.groups import GroupMLP
from halo_mpi.model.llama import Transformer

PROMPTS = ["The capital of France is",
           "def fibonacci(n):\n    if n < 2:\n        return n",
           "In 2024, 3 cats and 12 dogs lived on Main Street.",
           "Die Katze sitzt auf der Matte, und der Hund schläft."]


def test_decode_with_cache_equals_full_forward(tiny_store):
    model = Transformer.from_store(tiny_store)
    ids = torch.tensor([5, 17, 99, 3, 42, 250, 7])
    full = model(ids, model.new_cache(16))                       # (7, vocab) in one pass
    cache = model.new_cache(16)
    steps = [model(ids[:3], cache)] + [model(ids[i:i + 1], cache) for i in range(3, 7)]
    assert torch.allclose(torch.cat(steps), full, atol=1e-5)


def test_disjoint_group_sets_sum_to_the_full_mlp(tiny_store):
    groups = tiny_store.mlp_groups(1)                            # (8, 3, 32, 64)
    x = torch.randn(3, 64)
    full = GroupMLP(groups)(x)
    parts = [GroupMLP(groups[ids], ids)(x) for ids in ([0, 5], [1, 2, 3], [4, 6, 7])]
    assert torch.allclose(sum(parts), full, atol=1e-5)
    assert torch.allclose(GroupMLP(groups).per_group(x).sum(1), full, atol=1e-5)
    gate, up, down_t = (torch.from_numpy(groups[:, i].reshape(-1, 64)) for i in range(3))
    naive = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down_t
    assert torch.allclose(full, naive, atol=1e-5)


@pytest.fixture(scope="module")
def hf_model(real_gguf_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(real_gguf_path.parent), gguf_file=real_gguf_path.name, dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_equal_transformers(real_model, real_store, hf_model, prompt):
    from halo_mpi.model.tokenizer import Tokenizer
    ids = Tokenizer.from_store(real_store).encode(prompt)
    cache = real_model.new_cache(len(ids) + 1)
    ours = real_model(torch.tensor(ids), cache)                  # (T, vocab), prefill
    nxt = int(ours[-1].argmax())
    ours_step = real_model(torch.tensor([nxt]), cache)[0]       # (vocab,), one decode step
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids + [nxt]])).logits[0]
    assert (ours - theirs[:-1]).abs().max().item() < 1e-3
    assert (ours_step - theirs[-1]).abs().max().item() < 1e-3


@pytest.mark.slow
def test_float16_weights_stay_close(real_store, real_model):
    fast = Transformer.from_store(real_store, dtype="float16")
    ids = torch.tensor([504, 3575, 282, 4649, 314])
    a, b = real_model(ids, real_model.new_cache(8)), fast(ids, fast.new_cache(8))
    assert (a - b).abs().max().item() < 0.25
    assert torch.equal(a.argmax(-1), b.argmax(-1))
