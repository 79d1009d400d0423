"""Writing stores (their layout: hdf5.py): a model tensor by tensor, or a rank's shard of a store."""
from __future__ import annotations

import os
from contextlib import contextmanager

import h5py
import numpy as np

from ..errors import HaloError
from ..model.config import ModelArgs
from ..model.quant import BLOCK, QUANT_DTYPES, bf16_bits, bf16_round, records_dtype
from .hdf5 import FORMAT, LAYOUT_VERSION, STORE_DTYPES, Store, float_to_records, layer_path
from .integrity import put_checksums

_STR = h5py.string_dtype("utf-8")


def check_quantizable(args: ModelArgs, store_dtype: str):
    """Blocks of 32 along every matrix's input: one clear error before any work."""
    if store_dtype not in QUANT_DTYPES:
        return
    bad = [(what, n) for what, n in (("dim", args.dim), ("group_size (hidden_dim / mlp_groups)",
                                                          args.group_size),
                                     ("n_rep * head_dim", args.n_rep * args.head_dim)) if n % BLOCK]
    if bad:
        what = ", ".join(f"{w} = {n}" for w, n in bad)
        raise HaloError(f"--store-dtype {store_dtype} quantizes blocks of {BLOCK} values, but {what} "
                        f"is not a multiple of {BLOCK}" + ("; choose --mlp-groups so that "
                        "hidden_dim / mlp_groups is" if "group_size" in what else ""))


class StoreWriter:
    """Writes a store tensor by tensor, so that a large model never sits whole in memory."""

    def __init__(self, path: str, args: ModelArgs, name: str, source: str, store_dtype: str = "float32"):
        if store_dtype not in STORE_DTYPES:
            raise HaloError(f"unknown store dtype {store_dtype!r}; choose one of {', '.join(STORE_DTYPES)}")
        check_quantizable(args, store_dtype)
        self.path, self.args, self.store_dtype = path, args, store_dtype
        self._tmp = f"{path}.partial"
        try:
            self.f = h5py.File(self._tmp, "w")
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
            raise HaloError(f"cannot write {path}: {why}") from None
        self.f.attrs.update(format=FORMAT, layout_version=LAYOUT_VERSION, store_dtype=store_dtype,
                            name=name, source=source, **args.to_attrs())

    def put(self, name: str, array: np.ndarray):
        """A float32 array (norms, and weights of a float32 store), or a weight matrix given as
        float32 that a quantized store quantizes (/embedding, /output)."""
        if records_dtype(array):                     # already records (copied from a store)
            self.create(name, array)
            return
        expected = self._expected_shape(name)
        if expected is not None and tuple(array.shape) != expected:
            raise HaloError(f"{name}: shape {tuple(array.shape)}, expected {expected}")
        leaf = name.rsplit("/", 1)[-1]
        kind = {"embedding": "row", "output": "row", "attn_groups": "attn", "mlp_groups": "mlp"}.get(leaf)
        if kind and self.store_dtype == "bfloat16":         # the 16 bits of each bfloat16 value
            self.create(name, bf16_bits(bf16_round(np.asarray(array, np.float32))))
            return
        if kind and self.store_dtype != "float32":
            # the embedding and head of a q4 store are q8_0, as in llama.cpp's Q4 files: at 4 bits
            # they alone cost SmolLM2 +9.8% perplexity, at 8 bits +0.1% (bench in the README)
            dtype = "q8_0" if kind == "row" else self.store_dtype
            self.create(name, float_to_records(self.args, kind, np.asarray(array, np.float32), dtype))
            return
        self.create(name, np.ascontiguousarray(array, dtype=np.float32))

    def create(self, name: str, stored: np.ndarray):
        """A dataset holding `stored` as it is, and its checksums (integrity.py)."""
        self.f.create_dataset(name, data=stored)
        put_checksums(self.f, name, stored)

    def put_layer(self, layer: int, attn_norm, ffn_norm, attn_groups, mlp_groups, group_ids=None):
        p = layer_path(layer)
        self.put(f"{p}/attn_norm", attn_norm)
        self.put(f"{p}/ffn_norm", ffn_norm)
        self.put(f"{p}/attn_groups", attn_groups)
        self.put(f"{p}/mlp_groups", mlp_groups)
        if group_ids is not None:
            self.create(f"{p}/mlp_group_ids", np.asarray(group_ids, np.int32))

    def put_tokenizer(self, tokens, token_type, merges, bos_id: int, eos_id: int, chat_template: str):
        g = self.f.create_group("tokenizer")
        g.create_dataset("tokens", data=np.array(tokens, dtype=object), dtype=_STR)
        g.create_dataset("token_type", data=np.asarray(token_type, np.int32))
        g.create_dataset("merges", data=np.array(merges, dtype=object), dtype=_STR)
        g.attrs.update(bos_id=int(bos_id), eos_id=int(eos_id), chat_template=chat_template or "")

    def _expected_shape(self, name: str):
        a = self.args
        leaf = name.rsplit("/", 1)[-1]
        return {"embedding": (a.vocab_size, a.dim), "output": (a.vocab_size, a.dim),
                "norm": (a.dim,), "attn_norm": (a.dim,), "ffn_norm": (a.dim,),
                "attn_groups": (a.n_kv_heads, a.attn_group_rows, a.dim)}.get(leaf)

    def close(self, ok: bool = True):
        try:
            self.f.close()
        except OSError:
            if ok:
                raise
        if ok:
            os.replace(self._tmp, self.path)  # a crash never leaves a half-written store behind
        elif os.path.exists(self._tmp):
            os.remove(self._tmp)


@contextmanager
def store_writer(path: str, args: ModelArgs, name: str, source: str, store_dtype: str = "float32"):
    w = StoreWriter(path, args, name, source, store_dtype)
    try:
        yield w
        w.close()
    except BaseException as e:
        w.close(ok=False)
        if isinstance(e, OSError) and not isinstance(e, HaloError):   # a full disk, a lost mount
            why = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
            raise HaloError(f"cannot write {path}: {why}; nothing was left behind") from None
        raise


def write_shard(store: Store, path: str, rank: int, size: int, groups_per_layer: list):
    """A per-rank copy of a store holding only `groups_per_layer[l]` of each MLP layer.

    Every shard keeps the attention groups and the output head (any rank may hold some of them,
    and a re-plan may move them); rank 0's also the embedding, norms and tokenizer.
    """
    a = store.args
    with store_writer(path, a, name=store.name, source=f"shard {rank}/{size} of {store.path}",
                      store_dtype=store.store_dtype) as w:
        w.f.attrs.update(shard_rank=rank, shard_size=size)
        if rank == 0 or a.tied_embeddings:   # (tied: the embedding is the head)
            w.put("embedding", store.embedding())
        if not a.tied_embeddings:
            w.put("output", store.output())
        if rank == 0:
            w.put("norm", store.final_norm())
            w.put_tokenizer(**store.tokenizer_data())
        for layer, ids in enumerate(groups_per_layer):
            ids = np.sort(np.asarray(ids, dtype=np.int64))
            p = layer_path(layer)
            w.put(f"{p}/attn_groups", store.attn_groups(layer))
            if rank == 0:
                attn_norm, ffn_norm = store.layer_norms(layer)
                w.put(f"{p}/attn_norm", attn_norm)
                w.put(f"{p}/ffn_norm", ffn_norm)
            w.put(f"{p}/mlp_groups", store.mlp_groups(layer, ids))
            w.create(f"{p}/mlp_group_ids", ids.astype(np.int32))
        if "calibration" in store.f:
            store.f.copy("calibration", w.f)
