"""A store's integrity: its datasets' shapes and dtypes against its attributes (at every open,
cheap: metadata only), and a CRC-32 of every stored item (written at convert, checked by
`halo-mpi info --verify` and, with `--verify`, on every read).

An item is what one read fetches: a neuron group, an attention group, a row of the embedding or
head (the first axis of those datasets); a norm vector or a shard's group ids is one item. The
checksums live beside the weights, one dataset per weight dataset:
    /checksums/<dataset path>  (n_items,) uint32   zlib.crc32 of each item's stored bytes
Why CRC-32 and not HDF5's fletcher32 filter: the filter needs chunked datasets, and the loaders
read groups with os.pread at offsets that only a contiguous dataset has (store/reader.py).
"""
from __future__ import annotations

import zlib

import h5py
import numpy as np

from ..errors import HaloError
from ..model.config import ModelArgs

CHECKSUMS = "checksums"
_ROWS = ("embedding", "output", "attn_groups", "mlp_groups")   # one item per first-axis index


# ---------------------------------------------------------------------------------------------
# shapes and dtypes, from the attributes

def expected_datasets(f: h5py.File, args: ModelArgs, store_dtype: str) -> dict[str, tuple]:
    """name -> (shape, dtype, required) of every weight dataset the attributes call for."""
    from .hdf5 import layer_path, record_dtype
    a, rank = args, f.attrs.get("shard_rank")
    lead = rank is None or int(rank) == 0                 # a worker's shard lacks what rank 0 reads

    def weights(kind: str, shape: tuple) -> tuple:        # float shape -> (shape, dtype) as stored
        if store_dtype == "float32":
            return shape, np.dtype(np.float32)
        if store_dtype == "bfloat16":
            return shape, np.dtype(np.uint16)
        sd = "q8_0" if kind == "row" else store_dtype     # the embedding and head are q8_0
        return shape[:1], record_dtype(a, kind, sd)

    f32 = np.dtype(np.float32)
    want = {"embedding": (*weights("row", (a.vocab_size, a.dim)), lead or a.tied_embeddings),
            "norm": ((a.dim,), f32, lead)}
    if not a.tied_embeddings:
        want["output"] = (*weights("row", (a.vocab_size, a.dim)), True)
    for layer in range(a.n_layers):
        p = layer_path(layer)
        groups = a.mlp_groups
        if rank is not None:
            groups = len(_group_ids(f, p, a))
            want[f"{p}/mlp_group_ids"] = ((groups,), np.dtype(np.int32), True)
        want[f"{p}/attn_norm"] = ((a.dim,), f32, lead)
        want[f"{p}/ffn_norm"] = ((a.dim,), f32, lead)
        want[f"{p}/attn_groups"] = (*weights("attn", (a.n_kv_heads, a.attn_group_rows, a.dim)), True)
        want[f"{p}/mlp_groups"] = (*weights("mlp", (groups, 3, a.group_size, a.dim)), True)
    return want


def _group_ids(f: h5py.File, p: str, a: ModelArgs) -> np.ndarray:
    ds = f.get(f"{p}/mlp_group_ids")
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in "iu":
        raise HaloError(f"dataset /{p}/mlp_group_ids is missing or not a list of integers")
    ids = ds[()].astype(np.int64)
    if len(ids) and (np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= a.mlp_groups):
        raise HaloError(f"dataset /{p}/mlp_group_ids holds {ids.tolist()}, not sorted groups of "
                        f"0..{a.mlp_groups - 1}")
    return ids


def check_layout(f: h5py.File, args: ModelArgs, store_dtype: str):
    """Raises HaloError naming the first dataset whose shape or dtype the attributes contradict
    (or one missing, or a layer more than n_layers)."""
    from .hdf5 import layer_path
    for name, (shape, dtype, required) in expected_datasets(f, args, store_dtype).items():
        ds = f.get(name)
        if ds is None:
            if required:
                raise HaloError(f"dataset /{name} is missing")
            continue
        if not isinstance(ds, h5py.Dataset):
            raise HaloError(f"/{name} is not a dataset")
        if ds.shape != shape:
            raise HaloError(f"dataset /{name} has shape {ds.shape}, but the attributes ask for {shape}")
        if ds.dtype != dtype:
            raise HaloError(f"dataset /{name} holds {_dtype_name(ds.dtype)}, a {store_dtype} store "
                            f"holds {_dtype_name(dtype)} there")
    layers = f.get("layers")
    extra = sorted(set(layers) - {layer_path(i)[7:] for i in range(args.n_layers)}) if layers else []
    if extra:
        raise HaloError(f"group /layers/{extra[0]} lies beyond the n_layers {args.n_layers} the "
                        f"attributes give")


def _dtype_name(dtype: np.dtype) -> str:
    return "records" if dtype.names else str(dtype)


# ---------------------------------------------------------------------------------------------
# checksums

def item_crcs(stored: np.ndarray, name: str) -> np.ndarray:
    """(n_items,) uint32: the CRC-32 of each item of an array as stored (see the module docstring)."""
    arr = np.ascontiguousarray(stored)
    if name.rsplit("/", 1)[-1] not in _ROWS:
        arr = arr.reshape(1, -1)                                       # one item
    raw = arr.view(np.uint8).reshape(arr.shape[0], -1) if arr.shape[0] else arr.reshape(0, 0)
    return np.fromiter((zlib.crc32(row) for row in raw), np.uint32, count=raw.shape[0])


def put_checksums(f: h5py.File, name: str, stored: np.ndarray):
    """Write (or replace) the checksums of dataset `name`, given the array as stored."""
    path = f"{CHECKSUMS}/{name}"
    if path in f:
        del f[path]
    f.create_dataset(path, data=item_crcs(stored, name))


def has_checksums(f: h5py.File) -> bool:
    return CHECKSUMS in f


def verify_items(f: h5py.File, name: str, items, stored: np.ndarray):
    """Compare what was just read (`stored`: items `items` of dataset `name`, as stored; items a
    slice, a list of indices or () for all) with the checksums written at convert."""
    sums = f.get(f"{CHECKSUMS}/{name}")
    if sums is None:
        raise HaloError(f"dataset /{name} has no checksum (written before checksums, or its "
                        f"/{CHECKSUMS} was removed); convert the model again to verify it")
    want = np.asarray(sums[()]).reshape(-1)
    index = np.arange(len(want))                       # the items that were read
    if name.rsplit("/", 1)[-1] in _ROWS and items != ():
        index = index[items]
    got = item_crcs(stored, name)
    bad = np.flatnonzero(got != want[index]) if len(got) == len(index) else [0]
    if len(bad):
        raise HaloError(f"dataset /{name} item {int(index[bad[0]])} does not match its checksum: "
                        f"the file is damaged; convert or copy it again")


def verify_store(f: h5py.File, args: ModelArgs, store_dtype: str, progress=None) -> int:
    """Check every weight dataset against its checksums; returns the items checked."""
    if not has_checksums(f):
        raise HaloError(f"the store holds no /{CHECKSUMS} (converted before checksums were "
                        f"written); convert it again to verify it")
    names = [n for n in expected_datasets(f, args, store_dtype) if n in f]
    count = 0
    for name in names if progress is None else progress(names):
        stored = f[name][()]
        verify_items(f, name, (), stored)
        count += len(item_crcs(stored, name))
    return count
