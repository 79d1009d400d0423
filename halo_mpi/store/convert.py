"""GGUF -> HDF5 neuron-group store, and synthetic random-weight stores of named LLaMA shapes.

    halo-mpi convert weights/SmolLM2-135M-Instruct.Q4_1.gguf -o weights/smollm2-135m.h5 --mlp-groups 24
    halo-mpi convert weights/smollm2-135m.h5 -o weights/smollm2-135m-q4.h5 --store-dtype q4
    halo-mpi convert --synthetic tinyllama-1.1b -o weights/tinyllama-1.1b-synthetic.h5

Quantized stores are written from float32 values: the GGUF's tensors dequantized, or a float32
store (calibrated and regrouped: calibration reorders neurons, so it runs on float32 first).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
from tqdm import tqdm

from ..errors import HaloError
from ..model.config import SHAPES, ModelArgs
from ..model.quant import records_dtype
from ..model.tokenizer import byte_symbols
from .hdf5 import Store, records_to_float
from .writer import store_writer

DEFAULT_MLP_GROUPS = 24
SUPPORTED_ARCHS = ("llama",)


# ---------------------------------------------------------------------------------------------
# group layout (shared by the GGUF and synthetic paths)

def cut_attn_groups(args: ModelArgs, wq, wk, wv, wo) -> np.ndarray:
    """Cut q/k/v/o into one group per KV head.

    wq (n_heads*hd, dim), wk/wv (n_kv*hd, dim), wo (dim, n_heads*hd) in the Hugging Face layout;
    query heads j*n_rep .. (j+1)*n_rep-1 share KV head j (transformers' repeat_kv order).
    Returns (n_kv, (2*n_rep+2)*hd, dim).
    """
    n_kv, d = args.n_kv_heads, args.dim
    q = wq.reshape(n_kv, args.n_rep * args.head_dim, d)     # (n_kv, n_rep*hd, dim)
    k = wk.reshape(n_kv, args.head_dim, d)                  # (n_kv, hd, dim)
    v = wv.reshape(n_kv, args.head_dim, d)                  # (n_kv, hd, dim)
    o = wo.T.reshape(n_kv, args.n_rep * args.head_dim, d)   # (n_kv, n_rep*hd, dim)
    return np.concatenate([q, k, v, o], axis=1)


def cut_mlp_groups(args: ModelArgs, w_gate, w_up, w_down) -> np.ndarray:
    """Cut the SwiGLU MLP into G neuron groups along the intermediate dimension.

    w_gate/w_up (hidden, dim), w_down (dim, hidden). Returns (G, 3, group_size, dim) with
    [g, 0] = gate rows, [g, 1] = up rows, [g, 2] = down columns transposed.
    """
    G, gs, d = args.mlp_groups, args.group_size, args.dim
    gate = w_gate.reshape(G, gs, d)
    up = w_up.reshape(G, gs, d)
    down_t = w_down.T.reshape(G, gs, d)
    return np.stack([gate, up, down_t], axis=1)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: (rows, in) -> the Hugging Face (rotate-half) layout."""
    rows, cols = w.shape
    return (w.reshape(n_heads, rows // n_heads // 2, 2, cols)   # (nh, hd/2, 2, in)
            .swapaxes(1, 2)                                    # (nh, 2, hd/2, in)
            .reshape(rows, cols))


# ---------------------------------------------------------------------------------------------
# GGUF

def _open_gguf(path: str):
    import gguf
    if not os.path.exists(path):
        raise HaloError(f"GGUF file {path} not found; run `halo-mpi fetch-weights` first")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors/IndexError on damaged files
        raise HaloError(f"{path} is not a readable GGUF file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'damaged'}); fetch it again") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise HaloError(f"GGUF metadata lacks {key}")
        return default
    return f.contents()


def default_groups(hidden_dim: int) -> int:
    """DEFAULT_MLP_GROUPS when it divides the intermediate size, else the nearest divisor."""
    return min((d for d in range(1, hidden_dim + 1) if hidden_dim % d == 0),
               key=lambda d: (abs(d - DEFAULT_MLP_GROUPS), d))


def gguf_args(reader, mlp_groups: int | None) -> ModelArgs:
    arch = _field(reader, "general.architecture", "unknown")
    if arch not in SUPPORTED_ARCHS:
        raise HaloError(f"GGUF architecture {arch!r} is not supported; halo-mpi runs LLaMA-family "
                        f"models ({', '.join(SUPPORTED_ARCHS)})")
    p = f"{arch}."
    tensors = {t.name for t in reader.tensors}
    hidden = int(_field(reader, p + "feed_forward_length"))
    return ModelArgs(
        dim=int(_field(reader, p + "embedding_length")),
        n_layers=int(_field(reader, p + "block_count")),
        n_heads=int(_field(reader, p + "attention.head_count")),
        n_kv_heads=int(_field(reader, p + "attention.head_count_kv",
                              _field(reader, p + "attention.head_count"))),
        hidden_dim=hidden,
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(_field(reader, p + "context_length", 2048)),
        tied_embeddings="output.weight" not in tensors,
        mlp_groups=mlp_groups or default_groups(hidden),
    )


def convert_gguf(gguf_path: str, out_path: str, mlp_groups: int | None = None,
                 progress: bool = True, store_dtype: str = "float32") -> ModelArgs:
    from gguf.quants import dequantize
    reader = _open_gguf(gguf_path)
    args = gguf_args(reader, mlp_groups)
    by_name = {t.name: t for t in reader.tensors}

    def tensor(name: str) -> np.ndarray:
        t = by_name.get(name)
        if t is None:
            raise HaloError(f"{gguf_path}: tensor {name} is missing")
        try:
            # F32 tensors come back as read-only memmaps: copy before anyone writes to them
            return np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise HaloError(f"{gguf_path}: cannot dequantize {name} ({e}); the file may be "
                            f"truncated: fetch it again") from None

    name = str(_field(reader, "general.name", os.path.basename(gguf_path)))
    with store_writer(out_path, args, name=name, source=_source_tag(gguf_path), store_dtype=store_dtype) as w:
        w.put("embedding", tensor("token_embd.weight"))
        w.put("norm", tensor("output_norm.weight"))
        if not args.tied_embeddings:
            w.put("output", tensor("output.weight"))
        for layer in tqdm(range(args.n_layers), desc="convert layers", unit="layer", disable=not progress):
            b = f"blk.{layer}."
            wq = unpermute_rope(tensor(b + "attn_q.weight"), args.n_heads)
            wk = unpermute_rope(tensor(b + "attn_k.weight"), args.n_kv_heads)
            w.put_layer(layer,
                        attn_norm=tensor(b + "attn_norm.weight"),
                        ffn_norm=tensor(b + "ffn_norm.weight"),
                        attn_groups=cut_attn_groups(args, wq, wk, tensor(b + "attn_v.weight"),
                                                tensor(b + "attn_output.weight")),
                        mlp_groups=cut_mlp_groups(args, tensor(b + "ffn_gate.weight"),
                                                 tensor(b + "ffn_up.weight"), tensor(b + "ffn_down.weight")))
        tokens = list(_field(reader, "tokenizer.ggml.tokens"))
        w.put_tokenizer(tokens=tokens,
                        token_type=list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))),
                        merges=list(_field(reader, "tokenizer.ggml.merges", [])),
                        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
                        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
                        chat_template=str(_field(reader, "tokenizer.chat_template", "")))
    return args


def _source_tag(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return f"{os.path.basename(path)} (sha256 of first MiB {h.hexdigest()[:16]})"


# ---------------------------------------------------------------------------------------------
# synthetic models

def synthetic_args(shape: str, mlp_groups: int | None) -> ModelArgs:
    if shape not in SHAPES:
        raise HaloError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return ModelArgs(**SHAPES[shape], mlp_groups=mlp_groups or default_groups(SHAPES[shape]["hidden_dim"]))


def byte_tokenizer(vocab_size: int) -> dict:
    """A byte-level vocabulary for synthetic models: specials, 256 byte symbols, unused fillers."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + byte_symbols()
    if vocab_size < len(tokens):
        raise HaloError(f"synthetic vocab_size {vocab_size} < {len(tokens)} byte tokens")
    tokens += [f"<unused_{i}>" for i in range(vocab_size - len(tokens))]
    token_type = [3] * 3 + [1] * 256 + [5] * (vocab_size - 259)
    return dict(tokens=tokens, token_type=token_type, merges=[], bos_id=1, eos_id=2, chat_template="")


def write_synthetic(shape: str, out_path: str, mlp_groups: int | None = None, seed: int = 0,
                    progress: bool = True, store_dtype: str = "float32") -> ModelArgs:
    """Random weights (LLaMA-style init: N(0, 0.02), residual projections scaled down by depth)."""
    args = synthetic_args(shape, mlp_groups)
    rng = np.random.default_rng(seed)

    def normal(*shape_, std=0.02):
        return (rng.standard_normal(shape_, dtype=np.float32) * np.float32(std))

    out_std = 0.02 / np.sqrt(2 * args.n_layers)
    hd_all = args.n_heads * args.head_dim
    with store_writer(out_path, args, name=f"synthetic-{shape}", source=f"random seed {seed}",
                      store_dtype=store_dtype) as w:
        w.put("embedding", normal(args.vocab_size, args.dim))
        w.put("norm", np.ones(args.dim, np.float32))
        if not args.tied_embeddings:
            w.put("output", normal(args.vocab_size, args.dim))
        for layer in tqdm(range(args.n_layers), desc="synthesize layers", unit="layer", disable=not progress):
            kv = args.n_kv_heads * args.head_dim
            w.put_layer(layer, attn_norm=np.ones(args.dim, np.float32),
                        ffn_norm=np.ones(args.dim, np.float32),
                        attn_groups=cut_attn_groups(args, normal(hd_all, args.dim), normal(kv, args.dim),
                                                normal(kv, args.dim), normal(args.dim, hd_all, std=out_std)),
                        mlp_groups=cut_mlp_groups(args, normal(args.hidden_dim, args.dim),
                                                 normal(args.hidden_dim, args.dim),
                                                 normal(args.dim, args.hidden_dim, std=out_std)))
        w.put_tokenizer(**byte_tokenizer(args.vocab_size))
    return args


# ---------------------------------------------------------------------------------------------
# a float32 store -> another store dtype

def convert_store(src_path: str, out_path: str, store_dtype: str, progress: bool = True) -> ModelArgs:
    """Re-write a float32 store (whole, not a shard) in store_dtype, keeping its tokenizer,
    calibration and predictors; one layer in memory at a time. A quantized store can be
    written back as float32 (exactly its dequantized weights), not quantized again."""
    with Store(src_path) as src:
        if src.store_dtype != "float32" and store_dtype != "float32":
            raise HaloError(f"{src_path} is a {src.store_dtype} store; convert from the float32 "
                            f"store or the GGUF (quantizing twice would round twice)")
        if "shard_rank" in src.f.attrs:
            raise HaloError(f"{src_path} is a shard; convert the whole store, then shard it")
        a = src.args
        with store_writer(out_path, a, name=src.name, source=f"{store_dtype} of {src_path}",
                          store_dtype=store_dtype) as w:
            def floats(kind: str, w: np.ndarray) -> np.ndarray:
                return records_to_float(a, kind, w) if records_dtype(w) else w
            w.put("embedding", floats("row", src.embedding()))
            w.put("norm", src.final_norm())
            if not a.tied_embeddings:
                w.put("output", floats("row", src.output()))
            for layer in tqdm(range(a.n_layers), desc=f"{store_dtype} layers", unit="layer",
                              disable=not progress):
                attn_norm, ffn_norm = src.layer_norms(layer)
                w.put_layer(layer, attn_norm, ffn_norm, floats("attn", src.attn_groups(layer)),
                            floats("mlp", src.mlp_groups(layer)))
            for extra in ("tokenizer", "calibration"):
                if extra in src.f:
                    src.f.copy(extra, w.f)
            for key, value in src.f.attrs.items():       # e.g. what calibration recorded
                if key not in w.f.attrs:
                    w.f.attrs[key] = value
    return a
