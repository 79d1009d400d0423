"""Hugging Face LLaMA folders -> stores: a tiny LlamaForCausalLM built and saved here (float32,
bfloat16, float16; one file or shards) gives transformers' logits; every store dtype writes the
same bytes as converting the float32 store; SmolLM2 converted from its GGUF and from a Hugging
Face folder made of the same GGUF hold the same store."""
import copy
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from halo_mpi.model.llama import Transformer
from halo_mpi.model.tokenizer import Tokenizer
from halo_mpi.store.convert import convert_gguf, convert_store
from halo_mpi.store.hdf5 import Store
from halo_mpi.store.hf import convert_hf

transformers = pytest.importorskip("transformers")
TEXT = "In 2024, 3 cats and 12 dogs lived on Main Street: the execution model."


def byte_bpe(vocab_size: int):
    """A byte-level BPE tokenizer (digits split, as SmolLM2's) trained on a Python topic."""
    import pydoc_data.topics

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator([pydoc_data.topics.topics["execmodel"]], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def hf_llama():
    """A 2-layer LlamaForCausalLM (GQA 4/2, untied head, vocabulary padded past the tokenizer's)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=256, vocab_size=416,
                                      max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():                   # norms away from 1, so that reading them is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, byte_bpe(400)


@pytest.fixture(scope="module")
def saved(hf_llama, tmp_path_factory):
    """folder name -> (path, the model as saved, float32): float32, bfloat16, float16 sharded."""
    model, tok = hf_llama
    out = {}
    for dtype, shard in ((torch.float32, None), (torch.bfloat16, None), (torch.float16, "200KB")):
        path = tmp_path_factory.mktemp(f"hf-{str(dtype)[6:]}")
        saved_model = copy.deepcopy(model).to(dtype)
        saved_model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
        tok.save_pretrained(path)
        out[str(dtype)[6:]] = (path, saved_model.float())   # the values saved, computed in float32
    return out


def store_logits(path, ids) -> torch.Tensor:                 # (T, vocab)
    with Store(str(path), verify=True) as s:
        model = Transformer.from_store(s)
        return model(torch.tensor(ids), model.new_cache(len(ids)))


@pytest.mark.parametrize("source", ["float32", "bfloat16", "float16"])
def test_a_converted_folder_gives_transformers_logits(saved, hf_llama, tmp_path, source):
    folder, reference = saved[source]
    if source == "float16":
        assert (folder / "model.safetensors.index.json").exists()      # sharded
    args = convert_hf(str(folder), str(tmp_path / "s.h5"), mlp_groups=8, progress=False)
    assert (args.vocab_size, args.mlp_groups, args.tied_embeddings) == (416, 8, False)
    ids = Tokenizer.from_store(Store(str(tmp_path / "s.h5"))).encode(TEXT)
    assert ids == hf_llama[1](TEXT)["input_ids"]                         # the same tokens
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0]               # (T, vocab)
    assert (store_logits(tmp_path / "s.h5", ids) - theirs).abs().max().item() < 1e-3


@pytest.mark.parametrize("store_dtype", ["bfloat16", "q8_0", "q4"])
def test_every_store_dtype_holds_what_the_float32_store_converts_to(saved, tmp_path, store_dtype):
    folder = str(saved["bfloat16"][0])
    convert_hf(folder, str(tmp_path / "f32.h5"), mlp_groups=8, progress=False)
    convert_hf(folder, str(tmp_path / "direct.h5"), mlp_groups=8, progress=False, store_dtype=store_dtype)
    convert_store(str(tmp_path / "f32.h5"), str(tmp_path / "via.h5"), store_dtype, progress=False)
    with h5py.File(tmp_path / "direct.h5") as a, h5py.File(tmp_path / "via.h5") as b:
        names = [n for n in ("embedding", "output", "layers/001/attn_groups", "layers/001/mlp_groups")]
        for name in names:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name][()], b[name][()]), name
    ids = list(range(3, 40))
    close = 0.05 if store_dtype == "bfloat16" else 0.5                   # rounding of the weights
    rounded, exact = store_logits(tmp_path / "direct.h5", ids), store_logits(tmp_path / "f32.h5", ids)
    assert (rounded - exact).abs().max() < close


GGUF_TO_HF = """
import os, sys, torch, transformers
gguf, out = sys.argv[1], sys.argv[2]
where, name = os.path.dirname(gguf), os.path.basename(gguf)
model = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
# a GGUF-loaded model will not save itself ("quantized with gguf"): its weights, into a fresh one
config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
plain.load_state_dict(model.state_dict())
plain.save_pretrained(out)
transformers.AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(out)
"""


@pytest.mark.slow
def test_smollm2_from_its_gguf_and_from_a_hugging_face_folder_agree(real_gguf_path, tmp_path):
    """transformers reads the GGUF (dequantized, q/k un-permuted) and saves a Hugging Face folder;
    converting that folder gives the store converting the GGUF gives, to the bit."""
    # in a process of its own: the test runner keeps none of transformers' 0.5 GB model
    done = subprocess.run([sys.executable, "-c", GGUF_TO_HF, str(real_gguf_path), str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    convert_gguf(str(real_gguf_path), str(tmp_path / "gguf.h5"), progress=False)
    convert_hf(str(tmp_path / "hf"), str(tmp_path / "hf.h5"), progress=False)
    with Store(str(tmp_path / "gguf.h5")) as a, Store(str(tmp_path / "hf.h5")) as b:
        assert a.args == b.args
        for layer in (0, 29):
            assert np.array_equal(a.attn_groups(layer), b.attn_groups(layer))
            assert np.array_equal(a.mlp_groups(layer), b.mlp_groups(layer))
            assert np.array_equal(a.layer_norms(layer)[1], b.layer_norms(layer)[1])
        assert np.array_equal(a.embedding(), b.embedding()) and np.array_equal(a.final_norm(), b.final_norm())
        ta, tb = a.tokenizer_data(), b.tokenizer_data()
        assert ta["tokens"] == tb["tokens"] and ta["merges"] == tb["merges"]
        for key in ("token_type", "bos_id", "eos_id"):
            assert ta[key] == tb[key], key


def test_a_truncated_or_inconsistent_folder_is_one_error(saved, tmp_path):
    from halo_mpi.errors import HaloError
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in saved["float32"][0].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(HaloError, match="ends inside tensor .*: the file is truncated"):
        convert_hf(str(folder), str(tmp_path / "t.h5"), mlp_groups=8, progress=False)
    weights.write_bytes(data)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 320}))
    with pytest.raises(HaloError, match=r"gate_proj.weight has shape \(256, 64\), config.json asks"):
        convert_hf(str(folder), str(tmp_path / "t.h5"), mlp_groups=8, progress=False)
    assert not (tmp_path / "t.h5").exists() and not (tmp_path / "t.h5.partial").exists()
