"""Reading safetensors files without torch: a Hugging Face model folder's tensors as float32.

A .safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and [begin, end) byte range (after the header), then the raw little-endian data.
A sharded model lists which file holds each tensor in model.safetensors.index.json.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import HaloError
from ..model.quant import from_bf16_bits

INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


@dataclass(frozen=True)
class Entry:
    path: str                  # the .safetensors file
    dtype: str                 # "F32", "F16", "BF16", "F64"
    shape: tuple[int, ...]
    begin: int                 # byte range in the file
    end: int


class SafetensorsFolder:
    """Every tensor of a folder's safetensors files (the index's files when there is one)."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, INDEX)
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HaloError(f"{index} has no weight_map")
            files = sorted({os.path.join(folder, f) for f in weight_map.values()})
        else:
            weight_map, files = None, sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise HaloError(f"{folder} holds no .safetensors file; halo-mpi reads Hugging Face "
                            f"folders saved with safetensors (save_pretrained's default)")
        self.entries: dict[str, Entry] = {}
        for path in files:
            self.entries.update(_entries(path))
        missing = sorted(set(weight_map or {}) - set(self.entries))
        if missing:
            raise HaloError(f"{index} lists {missing[0]} in {weight_map[missing[0]]}, which does not hold it")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def dtypes(self) -> set[str]:
        return {e.dtype for e in self.entries.values()}

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name` as float32, checked to have `shape`."""
        e = self.entries.get(name)
        if e is None:
            raise HaloError(f"{self.folder}: tensor {name} is missing")
        if tuple(e.shape) != tuple(shape):
            raise HaloError(f"{e.path}: tensor {name} has shape {tuple(e.shape)}, config.json asks "
                            f"for {tuple(shape)}")
        if e.dtype not in _DTYPES:
            raise HaloError(f"{e.path}: tensor {name} is {e.dtype}; halo-mpi reads "
                            f"{', '.join(_DTYPES)}")
        raw = np.dtype(_DTYPES[e.dtype])
        if e.end - e.begin != raw.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise HaloError(f"{e.path}: tensor {name}'s byte range does not fit its shape")
        with open(e.path, "rb") as f:
            f.seek(e.begin)
            data = f.read(e.end - e.begin)
        if len(data) != e.end - e.begin:
            raise HaloError(f"{e.path} ends inside tensor {name}: the file is truncated")
        values = np.frombuffer(data, raw.newbyteorder("<")).reshape(shape)
        return from_bf16_bits(values) if e.dtype == "BF16" else values.astype(np.float32)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise HaloError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HaloError(f"{path} is not valid JSON ({e})") from None


def _entries(path: str) -> dict[str, Entry]:
    """The tensors a .safetensors file holds, from its header."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except OSError as e:
        raise HaloError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise HaloError(f"{path} is not a safetensors file (its header does not read)")
    start = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        if start + end > size:
            raise HaloError(f"{path} ends inside tensor {name}: the file is truncated")
        out[name] = Entry(path, meta["dtype"], tuple(meta["shape"]), start + begin, start + end)
    return out
