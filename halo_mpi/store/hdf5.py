"""The HDF5 neuron-group store: one self-describing file per model (or per rank, for shards).

Layout (layout_version 2), as `h5dump -H` shows it for store_dtype float32:

    /                       attrs: format="halo-mpi-store", layout_version, store_dtype, name,
                                   source, and every ModelArgs field (dim, n_layers, ..., mlp_groups)
    /embedding              (vocab_size, dim)    float32  token embedding
    /norm                   (dim,)               float32  final RMSNorm weight
    /output                 (vocab_size, dim)    float32  output head (only if not tied_embeddings)
    /layers/000/attn_norm   (dim,)               float32
    /layers/000/ffn_norm    (dim,)               float32
    /layers/000/attn_groups (n_kv_heads, (2*n_rep+2)*head_dim, dim)  one group per KV head, rows:
                              [0, R)        wq rows of the group's n_rep query heads (R = n_rep*head_dim)
                              [R, R+hd)     wk rows of the KV head
                              [R+hd, R+2hd) wv rows of the KV head
                              [R+2hd, 2R+2hd) wo columns of the group's query heads, transposed
    /layers/000/mlp_groups  (G, 3, group_size, dim)  one neuron group per index g:
                              [g, 0] gate rows, [g, 1] up rows, [g, 2] down columns transposed,
                              so a group is one contiguous block and loading it is one read
    /layers/000/mlp_group_ids (G_local,) int32   only in shard files: which groups this file holds
    /tokenizer/tokens       (vocab_size,) utf-8 strings;  /tokenizer/token_type (vocab_size,) int32
    /tokenizer/merges       (n_merges,) utf-8 strings;    attrs: bos_id, eos_id, chat_template
    /calibration/static_importance (n_layers, G) float32   mean contribution norm of each MLP group
                              on calibration text, each layer's row summing to 1 (`halo-mpi calibrate`)

A shard file (`halo-mpi shard`) has the same layout and attributes plus shard_rank/shard_size;
a worker's shard holds its MLP groups (with mlp_group_ids), every attention group, the output head
(the embedding when tied) and the calibration.

Weights are stored contiguously (no chunking) so that a hyperslab of consecutive groups is a
single read. store_dtype float32 holds the dequantized GGUF values as above; bfloat16 the same
shapes as uint16, the upper 16 bits of each float32 after rounding to the nearest bfloat16 (read
back as float32; `--dtype bfloat16` computes in bfloat16). store_dtype q8_0 or
q4 (see model/quant.py) holds the same datasets as records, one HDF5 compound element per group
(per row for /embedding and /output), each element carrying its codes and its blocks' scales, so a
group is still one contiguous read:
    /embedding, /output     (vocab_size,)  fields row_codes, row_scale: a (1, dim) q8_0 matrix
                                           (q8_0 in q4 stores too: 4 bits cost the head too much)
    /layers/000/attn_groups (n_kv_heads,)  qkv ((n_rep+2)*hd, dim): the q, k, v rows;
                                           o: W_o[:, heads of the group], (dim, n_rep*hd)
    /layers/000/mlp_groups  (G,)           gate (group_size, dim), up (group_size, dim),
                                           down: W_down[:, neurons of the group], (dim, group_size)
Blocks of 32 run along each matrix's input dimension, so a quantized store needs a group_size and
a head_dim*n_rep that are multiples of 32. Norms stay float32.
Version 1 stores (float32 only, no store_dtype) are refused with the command that reconverts them.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import h5py
import numpy as np

from ..errors import HaloError
from ..model.config import ModelArgs
from ..model.quant import (
    BLOCK,
    QUANT_DTYPES,
    bf16_bits,
    bf16_round,
    from_bf16_bits,
    from_records,
    record_fields,
    records_dtype,
    to_records,
)

FORMAT = "halo-mpi-store"
LAYOUT_VERSION = 2
STORE_DTYPES = ("float32", "bfloat16") + QUANT_DTYPES
_STR = h5py.string_dtype("utf-8")


def layer_path(layer: int) -> str:
    return f"layers/{layer:03d}"


# ---------------------------------------------------------------------------------------------
# quantized records: the matrices of a group (or a row) and their shapes

def record_parts(args: ModelArgs, kind: str) -> list[tuple[str, tuple[int, int]]]:
    """The (N, K) matrices of one record: kind "mlp" (a neuron group), "attn" (a KV-head group)
    or "row" (a row of the embedding or head)."""
    a, R = args, args.n_rep * args.head_dim
    return {"mlp": [("gate", (a.group_size, a.dim)), ("up", (a.group_size, a.dim)),
                    ("down", (a.dim, a.group_size))],
            "attn": [("qkv", (R + 2 * a.head_dim, a.dim)), ("o", (a.dim, R))],
            "row": [("row", (1, a.dim))]}[kind]


def record_dtype(args: ModelArgs, kind: str, store_dtype: str) -> np.dtype:
    return np.dtype(sum((record_fields(n, shape, store_dtype) for n, shape in record_parts(args, kind)), []))


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


def float_to_records(args: ModelArgs, kind: str, w: np.ndarray, store_dtype: str) -> np.ndarray:
    """Float arrays in the float32 layout -> records (n,) of store_dtype.
    mlp: (G, 3, gs, dim); attn: (n_kv, (2*n_rep+2)*hd, dim); row: (vocab, dim)."""
    recs = np.zeros(w.shape[0], dtype=record_dtype(args, kind, store_dtype))
    if kind == "mlp":
        to_records(recs, "gate", w[:, 0])
        to_records(recs, "up", w[:, 1])
        to_records(recs, "down", w[:, 2].transpose(0, 2, 1))      # (G, gs, dim) -> (G, dim, gs)
    elif kind == "attn":
        split = (2 + args.n_rep) * args.head_dim                    # q | k | v rows, then o^T
        to_records(recs, "qkv", w[:, :split])
        to_records(recs, "o", w[:, split:].transpose(0, 2, 1))      # (n, R, dim) -> (n, dim, R)
    else:
        to_records(recs, "row", w[:, None, :])                     # (vocab, dim) -> (vocab, 1, dim)
    return recs


def records_to_float(args: ModelArgs, kind: str, recs: np.ndarray) -> np.ndarray:
    """The inverse of float_to_records: exact (dequantizing rounds nothing)."""
    n = recs.shape[0]

    def each(name: str) -> np.ndarray:                              # (n, N, K)
        m = from_records(recs, name)
        return m.dequantize().reshape(n, -1, m.shape[1])
    if kind == "mlp":
        return np.stack([each("gate"), each("up"), each("down").transpose(0, 2, 1)], axis=1)
    if kind == "attn":
        return np.concatenate([each("qkv"), each("o").transpose(0, 2, 1)], axis=1)
    return each("row")[:, 0]


# ---------------------------------------------------------------------------------------------
# writing

class StoreWriter:
    """Writes a store tensor by tensor, so that a large model never sits whole in memory."""

    def __init__(self, path: str, args: ModelArgs, name: str, source: str, store_dtype: str = "float32"):
        if store_dtype not in STORE_DTYPES:
            raise HaloError(f"unknown store dtype {store_dtype!r}; choose one of {', '.join(STORE_DTYPES)}")
        check_quantizable(args, store_dtype)
        self.path, self.args, self.store_dtype = path, args, store_dtype
        self._tmp = f"{path}.partial"
        self.f = h5py.File(self._tmp, "w")
        self.f.attrs.update(format=FORMAT, layout_version=LAYOUT_VERSION, store_dtype=store_dtype,
                            name=name, source=source, **args.to_attrs())

    def put(self, name: str, array: np.ndarray):
        """A float32 array (norms, and weights of a float32 store), or a weight matrix given as
        float32 that a quantized store quantizes (/embedding, /output)."""
        if records_dtype(array):                     # already records (copied from a store)
            self.f.create_dataset(name, data=array)
            return
        expected = self._expected_shape(name)
        if expected is not None and tuple(array.shape) != expected:
            raise HaloError(f"{name}: shape {tuple(array.shape)}, expected {expected}")
        leaf = name.rsplit("/", 1)[-1]
        kind = {"embedding": "row", "output": "row", "attn_groups": "attn", "mlp_groups": "mlp"}.get(leaf)
        if kind and self.store_dtype == "bfloat16":         # the 16 bits of each bfloat16 value
            self.f.create_dataset(name, data=bf16_bits(bf16_round(np.asarray(array, np.float32))))
            return
        if kind and self.store_dtype != "float32":
            # the embedding and head of a q4 store are q8_0, as in llama.cpp's Q4 files: at 4 bits
            # they alone cost SmolLM2 +9.8% perplexity, at 8 bits +0.1% (bench in the README)
            dtype = "q8_0" if kind == "row" else self.store_dtype
            array = float_to_records(self.args, kind, np.asarray(array, np.float32), dtype)
            self.f.create_dataset(name, data=array)
            return
        self.f.create_dataset(name, data=np.ascontiguousarray(array, dtype=np.float32))

    def put_layer(self, layer: int, attn_norm, ffn_norm, attn_groups, mlp_groups, group_ids=None):
        p = layer_path(layer)
        self.put(f"{p}/attn_norm", attn_norm)
        self.put(f"{p}/ffn_norm", ffn_norm)
        self.put(f"{p}/attn_groups", attn_groups)
        self.put(f"{p}/mlp_groups", mlp_groups)
        if group_ids is not None:
            self.f.create_dataset(f"{p}/mlp_group_ids", data=np.asarray(group_ids, np.int32))

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


# ---------------------------------------------------------------------------------------------
# reading

class Store:
    """Read access to a store file; every read returns new float32 numpy arrays."""

    def __init__(self, path: str):
        self.path = str(path)
        self.f = open_store_file(self.path)
        self.args = ModelArgs.from_attrs(self.f.attrs)
        self.name = str(self.f.attrs.get("name", os.path.basename(self.path)))
        self.store_dtype = str(self.f.attrs["store_dtype"])   # float32, q8_0 or q4

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self, name: str, sel=()) -> np.ndarray:
        """float32 arrays, or records (quantized weights; see model/quant.py) as stored."""
        try:
            ds = self.f[name]
            if ds.dtype == np.uint16:                          # a bfloat16 store's weights
                return from_bf16_bits(ds[sel])
            return ds[sel] if ds.dtype.names else np.asarray(ds[sel], dtype=np.float32)
        except KeyError:
            raise HaloError(f"{self.path}: dataset /{name} is missing; reconvert the model") from None
        except OSError as e:
            raise HaloError(f"{self.path}: cannot read /{name} ({e}); the file may be truncated") from None

    def embedding(self) -> np.ndarray:          # (vocab, dim)
        return self._read("embedding")

    def final_norm(self) -> np.ndarray:         # (dim,)
        return self._read("norm")

    def output(self) -> np.ndarray:             # (vocab, dim); the embedding when tied
        return self._read("embedding" if self.args.tied_embeddings else "output")

    def layer_norms(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        p = layer_path(layer)
        return self._read(f"{p}/attn_norm"), self._read(f"{p}/ffn_norm")

    def attn_groups(self, layer: int, ids=None) -> np.ndarray:   # (len(ids), (2*n_rep+2)*hd, dim)
        """Attention groups (one per KV head) by id, all of them by default."""
        name = f"{layer_path(layer)}/attn_groups"
        if ids is None:
            return self._read(name)
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= self.args.n_kv_heads):
            raise HaloError(f"attention groups {ids.tolist()} are not sorted KV heads of this model")
        if len(ids) and ids[-1] - ids[0] + 1 == len(ids):
            return self._read(name, np.s_[int(ids[0]):int(ids[-1]) + 1])
        if len(ids):
            return self._read(name, ids.tolist())
        ds = self.f[name]
        return np.empty((0,) + ds.shape[1:], ds.dtype if ds.dtype.names else np.float32)

    def output_rows(self, start: int, stop: int) -> np.ndarray:   # (stop - start, dim)
        """A vocabulary slice of the output head (of the embedding when tied): one contiguous read."""
        return self._read("embedding" if self.args.tied_embeddings else "output", np.s_[start:stop])

    def embedding_rows(self, ids: np.ndarray) -> np.ndarray:      # (len(ids), dim)
        """Embedding rows of token ids, in their order, read from the file (repeats allowed)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 1:
            return self._read("embedding", np.s_[int(ids[0]):int(ids[0]) + 1])
        unique, where = np.unique(ids, return_inverse=True)    # h5py wants increasing indices
        return self._read("embedding", unique.tolist())[where]

    def mlp_group_ids(self, layer: int) -> np.ndarray:
        """The global ids of the MLP groups this file holds for `layer` (all of them, unless a shard)."""
        p = f"{layer_path(layer)}/mlp_group_ids"
        if p in self.f:
            return np.asarray(self.f[p][()], dtype=np.int64)
        return np.arange(self.args.mlp_groups)

    def mlp_groups(self, layer: int, ids=None) -> np.ndarray:   # (len(ids), 3, group_size, dim)
        """Read MLP groups by global id; consecutive ids are read as one hyperslab."""
        held = self.mlp_group_ids(layer)
        name = f"{layer_path(layer)}/mlp_groups"
        if ids is None:
            return self._read(name)
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.searchsorted(held, ids)
        if np.any(rows >= len(held)) or np.any(held[np.minimum(rows, len(held) - 1)] != ids):
            raise HaloError(f"{self.path}: layer {layer} does not hold MLP groups "
                            f"{sorted(set(ids.tolist()) - set(held.tolist()))}")
        ds = self.f[name]
        shape, dtype = (len(rows),) + ds.shape[1:], ds.dtype if ds.dtype.names else np.float32
        if len(rows) == 0:
            return np.empty(shape, dtype)
        if np.all(np.diff(rows) == 1):
            return self._read(name, np.s_[rows[0]:rows[-1] + 1])
        order = np.argsort(rows)                            # h5py wants increasing indices
        out = np.empty(shape, dtype)
        out[order] = self._read(name, rows[order].tolist())
        return out

    def item_bytes(self, what: str) -> int:
        """Bytes one element takes as stored: an MLP group ("mlp"), an attention group ("attn")
        or a row of the output head ("head"), in this store's dtype (placement's memory budgets)."""
        name = {"mlp": "layers/000/mlp_groups", "attn": "layers/000/attn_groups",
                "head": "embedding" if self.args.tied_embeddings else "output"}[what]
        ds = self.f[name]
        return ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))

    def tokenizer_data(self) -> dict:
        if "tokenizer" not in self.f:
            raise HaloError(f"{self.path} holds no tokenizer (synthetic store?); pass token ids instead")
        g = self.f["tokenizer"]
        return dict(tokens=[t.decode() if isinstance(t, bytes) else t for t in g["tokens"][()]],
                    token_type=g["token_type"][()].tolist(),
                    merges=[m.decode() if isinstance(m, bytes) else m for m in g["merges"][()]],
                    bos_id=int(g.attrs["bos_id"]), eos_id=int(g.attrs["eos_id"]),
                    chat_template=str(g.attrs.get("chat_template", "")))

    def has_tokenizer(self) -> bool:
        return "tokenizer" in self.f

    def calibration(self, name: str) -> np.ndarray | None:
        p = f"calibration/{name}"
        return np.asarray(self.f[p][()], dtype=np.float32) if p in self.f else None


def write_calibration(path: str, arrays: dict[str, np.ndarray], attrs: dict | None = None):
    """Add or replace datasets under /calibration of an existing store."""
    open_store_file(path).close()
    with h5py.File(path, "r+") as f:
        g = f.require_group("calibration")
        for name, arr in arrays.items():
            if name in g:
                del g[name]
            g.create_dataset(name, data=arr)
        g.attrs.update(attrs or {})


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
            w.f.create_dataset(f"{p}/mlp_group_ids", data=ids.astype(np.int32))
        if "calibration" in store.f:
            store.f.copy("calibration", w.f)


def open_store_file(path: str) -> h5py.File:
    """Open and validate a store: one clear HaloError for every way the file can be wrong."""
    if not os.path.exists(path):
        raise HaloError(f"weights file {path} not found; create it with `halo-mpi fetch-weights` "
                        f"and `halo-mpi convert` (or `make weights`)")
    if not h5py.is_hdf5(path):
        raise HaloError(f"{path} is not an HDF5 file; pass a store written by `halo-mpi convert`")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise HaloError(f"{path} cannot be opened ({str(e).splitlines()[0]}); it is probably "
                        f"truncated: convert it again") from None
    fmt = f.attrs.get("format")
    if fmt != FORMAT:
        f.close()
        raise HaloError(f"{path} is an HDF5 file but not a halo-mpi store (no format={FORMAT!r} "
                        f"attribute); convert a GGUF with `halo-mpi convert`")
    version = int(f.attrs.get("layout_version", -1))
    if version != LAYOUT_VERSION:
        f.close()
        raise HaloError(f"{path} has store layout version {version}, this halo-mpi reads version "
                        f"{LAYOUT_VERSION}; convert the model again: `halo-mpi convert "
                        f"weights/SmolLM2-135M-Instruct.Q4_1.gguf -o {path}` (or `make weights`)")
    return f
