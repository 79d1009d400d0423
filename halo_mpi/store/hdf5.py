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

    /checksums/<path>       (n_items,) uint32  CRC-32 of each item of weight dataset <path> as stored
                              (a group, a row; a norm is one item): integrity.py

Every open checks each dataset's shape and dtype against the attributes (integrity.py, metadata
only); `Store(path, verify=True)` (`--verify`) also checks the checksums.

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

This module holds the layout and reading it (`Store`); writer.py writes stores and shards.
"""
from __future__ import annotations

import os

import h5py
import numpy as np

from ..errors import HaloError
from ..model.config import ModelArgs
from ..model.quant import QUANT_DTYPES, from_bf16_bits, from_records, record_fields, to_records
from .integrity import check_layout, verify_items, verify_store

FORMAT = "halo-mpi-store"
LAYOUT_VERSION = 2
STORE_DTYPES = ("float32", "bfloat16") + QUANT_DTYPES


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
# reading

class Store:
    """Read access to a store file; every read returns new float32 numpy arrays."""

    def __init__(self, path: str, verify: bool = False):
        """verify: check the whole file at open, and every read after, against the checksums
        written at convert (integrity.py)."""
        self.path, self.verify = str(path), verify
        self.f = open_store_file(self.path)
        try:
            self.args, self.store_dtype = store_args(self.f)
            check_layout(self.f, self.args, self.store_dtype)   # metadata only: ~1 ms a layer
        except HaloError as e:
            self.f.close()
            raise HaloError(f"{self.path}: {e}; the store is damaged or was edited: convert it "
                            f"again") from None
        if verify:          # the whole file once, so that every rank finds damage before any work
            try:
                verify_store(self.f, self.args, self.store_dtype)
            except HaloError as e:
                self.f.close()
                raise HaloError(f"{self.path}: {e}") from None
        self.name = str(self.f.attrs.get("name", os.path.basename(self.path)))

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
            stored = ds[sel]
            if self.verify:
                verify_items(self.f, name, sel, stored)
            if ds.dtype == np.uint16:                          # a bfloat16 store's weights
                return from_bf16_bits(stored)
            return stored if ds.dtype.names else np.asarray(stored, dtype=np.float32)
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

    @property
    def regrouped(self) -> bool:
        """Calibration reordered this store's neurons into co-activation groups (`calibrate --regroup`)."""
        return "calibration" in self.f and bool(self.f["calibration"].attrs.get("regrouped"))


def store_args(f: h5py.File) -> tuple[ModelArgs, str]:
    """The model's hyperparameters and the store dtype, from the root attributes."""
    store_dtype = str(f.attrs.get("store_dtype", ""))
    if store_dtype not in STORE_DTYPES:
        raise HaloError(f"attribute store_dtype {store_dtype!r} is none of {', '.join(STORE_DTYPES)}")
    try:
        return ModelArgs.from_attrs(f.attrs), store_dtype
    except (TypeError, ValueError) as e:
        raise HaloError(f"an attribute is not a number ({e})") from None


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



def open_store_file(path: str) -> h5py.File:
    """Open and validate a store: one clear HaloError for every way the file can be wrong."""
    if not os.path.exists(path):
        raise HaloError(f"weights file {path} not found; create it with `halo-mpi fetch-weights` "
                        f"and `halo-mpi convert` (or `make weights`)")
    if os.path.isdir(path):
        raise HaloError(f"{path} is a folder; pass a store file written by `halo-mpi convert`")
    try:
        with open(path, "rb") as probe:
            probe.read(8)
    except OSError as e:
        raise HaloError(f"cannot read {path}: {e.strerror}") from None
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
