"""A Hugging Face LLaMA folder -> HDF5 neuron-group store.

    halo-mpi convert path/to/SmolLM2-135M-Instruct -o weights/smollm2-hf.h5 --store-dtype q4

The folder is what `save_pretrained` writes: config.json (LlamaForCausalLM), tokenizer.json
(byte-level BPE, as SmolLM2's and Llama 3's), tokenizer_config.json (its chat template), and the
weights in *.safetensors, one file or shards listed by model.safetensors.index.json, in float32,
bfloat16 or float16 (read as float32: exact). Hugging Face's q/k rows are already in the
rotate-half layout this project computes with (a GGUF's are permuted: convert.unpermute_rope).
"""
from __future__ import annotations

import json
import os

import numpy as np
from tqdm import tqdm

from ..errors import HaloError
from ..model.config import ModelArgs
from .convert import cut_attn_groups, cut_mlp_groups, default_groups
from .safetensors import SafetensorsFolder, _read_json
from .writer import store_writer

CONTROL, NORMAL, UNUSED = 3, 1, 5         # GGUF token types, as the store keeps them


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def hf_args(config: dict, path: str, mlp_groups: int | None) -> ModelArgs:
    """ModelArgs from config.json; what this project's LLaMA does not compute is refused by name."""
    arch = config.get("architectures") or [config.get("model_type")]
    if config.get("model_type") != "llama":
        raise HaloError(f"{path}: model_type {config.get('model_type')!r} ({arch[0]}) is not "
                        f"supported; halo-mpi runs LLaMA-family models (LlamaForCausalLM)")
    rope = config.get("rope_parameters") or {}              # transformers >= 5 nests RoPE here
    scaled = rope if rope.get("rope_type", "default") != "default" else None
    unsupported = {"rope_scaling": config.get("rope_scaling") or scaled,
                   "attention_bias": config.get("attention_bias", False),
                   "mlp_bias": config.get("mlp_bias", False)}
    if config.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = config["hidden_act"]
    for key, value in unsupported.items():
        if value:
            raise HaloError(f"{path}: {key} {value!r} is not supported by halo-mpi's LLaMA")
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        if int(config.get("head_dim") or dim // heads) != dim // heads:
            raise HaloError(f"{path}: head_dim {config['head_dim']} differs from hidden_size / "
                            f"num_attention_heads ({dim // heads}); not supported")
        hidden = int(config["intermediate_size"])
        return ModelArgs(
            dim=dim, n_layers=int(config["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=int(config.get("num_key_value_heads") or heads), hidden_dim=hidden,
            vocab_size=int(config["vocab_size"]),
            rope_theta=float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            mlp_groups=mlp_groups or default_groups(hidden))
    except KeyError as e:
        raise HaloError(f"{path}: config.json lacks {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise HaloError(f"{path}: config.json holds a value that is not a number ({e})") from None


def hf_tokenizer(folder: str, config: dict, vocab_size: int) -> dict:
    """The store's tokenizer data from tokenizer.json (byte-level BPE only), padded to vocab_size."""
    doc = _read_json(os.path.join(folder, "tokenizer.json"))
    model = doc.get("model") or {}
    levels = json.dumps([doc.get("pre_tokenizer"), doc.get("decoder")])
    if model.get("type") != "BPE" or "ByteLevel" not in levels:
        raise HaloError(f"{folder}/tokenizer.json is a {model.get('type')} tokenizer without "
                        f"byte-level pieces; halo-mpi reads byte-level BPE (SmolLM2, Llama 3)")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    special = set()
    for added in doc.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        if added.get("special"):
            special.add(int(added["id"]))
    if max(by_id) >= vocab_size:
        raise HaloError(f"{folder}/tokenizer.json has token id {max(by_id)}, but vocab_size is {vocab_size}")
    tokens = [by_id.get(i, f"<unused_{i}>") for i in range(vocab_size)]
    token_type = [CONTROL if i in special else NORMAL if i in by_id else UNUSED for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    extra, jinja = os.path.join(folder, "tokenizer_config.json"), os.path.join(folder, "chat_template.jinja")
    chat = _read_json(extra).get("chat_template", "") if os.path.exists(extra) else ""
    if not chat and os.path.exists(jinja):                     # transformers >= 5 writes it apart
        with open(jinja, encoding="utf-8") as f:
            chat = f.read()
    eos = config.get("eos_token_id", 2)
    return dict(tokens=tokens, token_type=token_type, merges=merges,
                bos_id=int(config.get("bos_token_id") or 1),
                eos_id=int(eos[0] if isinstance(eos, list) else eos),
                chat_template=chat if isinstance(chat, str) else "")


def _model_name(config: dict, folder: str) -> str:
    return str(config.get("_name_or_path") or config.get("_model_name_or_path")
               or os.path.basename(os.path.abspath(folder)))


def convert_hf(folder: str, out_path: str, mlp_groups: int | None = None, progress: bool = True,
               store_dtype: str = "float32") -> ModelArgs:
    config = _read_json(os.path.join(folder, "config.json"))
    args = hf_args(config, folder, mlp_groups)
    weights = SafetensorsFolder(folder)
    if not args.tied_embeddings and "lm_head.weight" not in weights:
        raise HaloError(f"{folder}: config.json says the head is not tied, but lm_head.weight is missing")
    tokenizer = hf_tokenizer(folder, config, args.vocab_size)
    a, row = args, (args.vocab_size, args.dim)
    dtypes = "/".join(sorted(weights.dtypes()))
    source = f"{os.path.basename(os.path.abspath(folder))} (Hugging Face, {dtypes})"
    with store_writer(out_path, args, name=_model_name(config, folder),
                      source=source, store_dtype=store_dtype) as w:
        w.put("embedding", weights.tensor("model.embed_tokens.weight", row))
        w.put("norm", weights.tensor("model.norm.weight", (a.dim,)))
        if not a.tied_embeddings:
            w.put("output", weights.tensor("lm_head.weight", row))
        for layer in tqdm(range(a.n_layers), desc="convert layers", unit="layer", disable=not progress):
            _put_layer(w, a, weights, layer)
        w.put_tokenizer(**tokenizer)
    return args


def _put_layer(w, a: ModelArgs, weights: SafetensorsFolder, layer: int):
    """One decoder layer's tensors, cut into attention and MLP groups."""
    p, hd = f"model.layers.{layer}.", a.head_dim

    def t(name: str, shape: tuple) -> np.ndarray:
        return weights.tensor(p + name, shape)
    q_rows, kv_rows = a.n_heads * hd, a.n_kv_heads * hd
    attn = cut_attn_groups(a, t("self_attn.q_proj.weight", (q_rows, a.dim)),
                           t("self_attn.k_proj.weight", (kv_rows, a.dim)),
                           t("self_attn.v_proj.weight", (kv_rows, a.dim)),
                           t("self_attn.o_proj.weight", (a.dim, q_rows)))
    mlp = cut_mlp_groups(a, t("mlp.gate_proj.weight", (a.hidden_dim, a.dim)),
                         t("mlp.up_proj.weight", (a.hidden_dim, a.dim)),
                         t("mlp.down_proj.weight", (a.dim, a.hidden_dim)))
    w.put_layer(layer, attn_norm=t("input_layernorm.weight", (a.dim,)),
                ffn_norm=t("post_attention_layernorm.weight", (a.dim,)), attn_groups=attn, mlp_groups=mlp)
