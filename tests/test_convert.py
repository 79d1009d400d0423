"""GGUF -> store on a tiny GGUF written like llama.cpp's converter, and synthetic stores."""
import numpy as np
import torch
from tiny_gguf import DIM, HEADS, HIDDEN, KV_HEADS, write_tiny_gguf

from halo_mpi.model.llama import Transformer, rms_norm
from halo_mpi.store.convert import convert_gguf, write_synthetic
from halo_mpi.store.hdf5 import Store


def test_convert_undoes_the_rope_permutation_and_cuts_groups(tmp_path):
    hf = write_tiny_gguf(tmp_path / "tiny.gguf")
    args = convert_gguf(str(tmp_path / "tiny.gguf"), str(tmp_path / "tiny.h5"), mlp_groups=4, progress=False)
    assert (args.dim, args.n_heads, args.n_kv_heads, args.hidden_dim, args.tied_embeddings) == \
        (DIM, HEADS, KV_HEADS, HIDDEN, True)
    with Store(str(tmp_path / "tiny.h5")) as s:
        attn = s.attn_groups(1)                       # (n_kv, (2*n_rep+2)*hd, dim)
        hd, rep = DIM // HEADS, HEADS // KV_HEADS
        q = attn[:, :rep * hd].reshape(-1, DIM)
        k = attn[:, rep * hd:rep * hd + hd].reshape(-1, DIM)
        assert np.array_equal(q, hf["blk.1.attn_q.weight"])
        assert np.array_equal(k, hf["blk.1.attn_k.weight"])
        mlp = s.mlp_groups(1)                         # (G, 3, gs, dim)
        assert np.array_equal(mlp[:, 0].reshape(-1, DIM), hf["blk.1.ffn_gate.weight"])
        assert np.array_equal(mlp[:, 2].reshape(-1, DIM), hf["blk.1.ffn_down.weight"].T)
        assert s.tokenizer_data()["tokens"][1] == "<|im_start|>"


def test_model_from_converted_gguf_matches_a_direct_computation(tmp_path):
    """One layer by hand (HF layout, rotate-half RoPE, GQA) against the model on the store."""
    hf = write_tiny_gguf(tmp_path / "tiny.gguf")
    convert_gguf(str(tmp_path / "tiny.gguf"), str(tmp_path / "tiny.h5"), mlp_groups=2, progress=False)
    with Store(str(tmp_path / "tiny.h5")) as s:
        model = Transformer.from_store(s)
    ids = torch.tensor([7, 100, 33])
    cache = model.new_cache(8)
    got = model.layers(model.embed(ids), cache, layer_ids=[0])
    t = {k: torch.from_numpy(v) for k, v in hf.items()}
    x = t["token_embd.weight"][ids]
    h_in = rms_norm(x, t["blk.0.attn_norm.weight"], 1e-5)
    hd = DIM // HEADS
    q = (h_in @ t["blk.0.attn_q.weight"].T).view(3, HEADS, hd).transpose(0, 1)
    k = (h_in @ t["blk.0.attn_k.weight"].T).view(3, KV_HEADS, hd).transpose(0, 1)
    v = (h_in @ t["blk.0.attn_v.weight"].T).view(3, KV_HEADS, hd).transpose(0, 1)
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).double() / hd)
    ang = torch.outer(torch.arange(3).double(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    rot = lambda z: z * cos + torch.cat([-z[..., hd // 2:], z[..., :hd // 2]], -1) * sin
    q, k = rot(q), rot(k).repeat_interleave(HEADS // KV_HEADS, 0)
    v = v.repeat_interleave(HEADS // KV_HEADS, 0)
    att = (q @ k.transpose(1, 2) / hd ** 0.5).masked_fill(torch.ones(3, 3).triu(1).bool(), -1e9)
    o = (att.softmax(-1) @ v).transpose(0, 1).reshape(3, DIM) @ t["blk.0.attn_output.weight"].T
    h = x + o
    m = rms_norm(h, t["blk.0.ffn_norm.weight"], 1e-5)
    mlp = (torch.nn.functional.silu(m @ t["blk.0.ffn_gate.weight"].T) * (m @ t["blk.0.ffn_up.weight"].T)) \
        @ t["blk.0.ffn_down.weight"].T
    assert torch.allclose(got, h + mlp, atol=1e-4)


def test_synthetic_store_is_deterministic_and_loadable(tmp_path):
    write_synthetic("tiny", str(tmp_path / "a.h5"), mlp_groups=4, seed=3, progress=False)
    write_synthetic("tiny", str(tmp_path / "b.h5"), mlp_groups=4, seed=3, progress=False)
    with Store(str(tmp_path / "a.h5")) as a, Store(str(tmp_path / "b.h5")) as b:
        assert np.array_equal(a.mlp_groups(1), b.mlp_groups(1))
        logits = Transformer.from_store(a)(torch.tensor([3, 4]), Transformer.from_store(a).new_cache(4))
        assert torch.isfinite(logits).all()
