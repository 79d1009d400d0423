"""A weight matrix held in the layout that streams fastest on this CPU for its dtype.

Decoding one token is a chain of matrix-vector products, bound by memory bandwidth. Measured on
the 2-core dev machine over 30 cache-cold matrices of the model's shapes (halo-mpi bench kernels):
- float32: x @ W_t with W_t (in, out) contiguous beats F.linear(x, W) with W (out, in) by ~1.4x
  (MKL's row-major sgemv streams at ~12 GB/s, the transposed form at ~17-19 GB/s);
- bfloat16 / float16: F.linear(x, W) with W (out, in) is ~2x faster than fp32 per token, but
  x @ W_t is 5-40x slower (no fast kernel for that layout).
So each Linear keeps W_t for float32 and W for the half types, and always returns float32.
Quantized weights (q8_0, q4) get a QuantLinear (model/quant.py) instead: `make_linear` picks.

Several rows at once (a batched decode step, a prefill) are another matter: MKL's and OpenBLAS's
sgemm pack the whole weight on every call, so on this AMD CPU 4 rows cost 4-6x one row (the
(576, 49152) head: 5 ms for one row, 20 ms for four, one thread). oneDNN's matmul on a weight
reordered once (`pack_rows`) streams it without repacking: four rows in ~1.1x one row's time,
but one row ~1.5x slower than MKL's sgemv. So a batching model keeps both: W_t for one row, the
reordered copy for several (twice the float32 weights' memory: nbytes, then packed_bytes).
Fewer rows than the layout is tuned for (4) run slower on it than 4 do (the head, one thread: 1,
2, 4 rows 6.1, 9.4, 6.7 ms), so 2 or 3 rows are padded to 4 (6.2 ms for 2).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .qlinear import QuantLinear
from .quant import QMatrix

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Linear:
    """y = x @ W^T for a weight W of shape (out, in); x (T, in) float32 -> y (T, out) float32."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.out_features, self.in_features = w.shape
        if dtype == torch.float32:
            self.w_t = w.T.contiguous()                 # (in, out)
        else:
            self.w = w.to(dtype).contiguous()           # (out, in)
        self.packed = None                              # oneDNN's reordered W, after pack_rows
        self.packed_rows = 0                            # the rows its layout is tuned for

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            if self.packed is not None and x.shape[0] > 1:
                n = x.shape[0]
                if n < self.packed_rows:
                    # fewer rows than the layout's run slower than that many (the head, one
                    # thread: 2 rows 9.4 ms, 4 rows 6.7): pad with zero rows, keep the first n
                    x = torch.cat([x, x.new_zeros(self.packed_rows - n, x.shape[1])])   # (rows, in)
                y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
                return y[:n]                                                         # (n, out)
            return torch.matmul(x, self.w_t)
        return F.linear(x.to(self.dtype), self.w).float()

    def pack_rows(self, rows: int = 4):
        """Keep a copy of W reordered by oneDNN for products of several rows (`rows`: the count
        its layout is tuned for); float32 only, where oneDNN is built in (else nothing)."""
        if self.dtype == torch.float32 and self.packed is None and torch.backends.mkldnn.is_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.w_t.T.contiguous(), rows)
            self.packed_rows = rows

    @classmethod
    def from_row_chunks(cls, out_features: int, in_features: int, chunks, dtype: torch.dtype = torch.float32):
        """W (out, in) given as (start, rows (n, in) float array) chunks, each copied into place, so
        that a build holds one chunk beside the result (not the whole W twice, as a transpose of
        W read at once would)."""
        lin = cls.__new__(cls)
        lin.dtype, lin.out_features, lin.in_features = dtype, out_features, in_features
        lin.packed, lin.packed_rows = None, 0
        if dtype == torch.float32:
            lin.w_t = torch.empty(in_features, out_features)            # (in, out)
        else:
            lin.w = torch.empty(out_features, in_features, dtype=dtype)  # (out, in)
        for start, rows in chunks:
            block = torch.from_numpy(rows)                               # (n, in)
            if dtype == torch.float32:
                lin.w_t[:, start:start + len(rows)] = block.T
            else:
                lin.w[start:start + len(rows)] = block.to(dtype)
        return lin

    def out_slice(self, x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """x @ W[a:b].T: outputs a..b only, (T, in) -> (T, b-a), reading only those weights."""
        if self.dtype == torch.float32:
            return torch.matmul(x, self.w_t[:, a:b])
        return F.linear(x.to(self.dtype), self.w[a:b]).float()

    def in_slice(self, x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """x @ W[:, a:b].T: inputs a..b only, (T, b-a) -> (T, out)."""
        if self.dtype == torch.float32:
            return torch.matmul(x, self.w_t[a:b])
        return F.linear(x.to(self.dtype), self.w[:, a:b]).float()

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows W[index] as float32, (T, in): the embedding lookup when the head is tied."""
        if self.dtype == torch.float32:
            return self.w_t[:, index].T.contiguous()    # (in, T) -> (T, in)
        return self.w[index].float()

    def weight(self) -> torch.Tensor:
        """W (out, in) as float32, for statistics (calibration, importance)."""
        return self.w_t.T if self.dtype == torch.float32 else self.w.float()

    @property
    def nbytes(self) -> int:
        t = self.w_t if self.dtype == torch.float32 else self.w
        return 0 if t is None else t.numel() * t.element_size()

    @property
    def packed_bytes(self) -> int:
        """The reordered copy's bytes (pack_rows), beside nbytes."""
        return self.out_features * self.in_features * 4 if self.packed is not None else 0

    def tensors(self) -> list[torch.Tensor]:
        """The weight tensors as computed on (a loader writes them out and binds them back)."""
        return [self.w_t if self.dtype == torch.float32 else self.w]

    def bind(self, tensors: list[torch.Tensor] | None):
        """Compute on these tensors (views into a load buffer), or on none (evicted)."""
        t = None if tensors is None else tensors[0]
        self.packed = None                              # a loader's weights are never packed
        if self.dtype == torch.float32:
            self.w_t = t
        else:
            self.w = t


def make_linear(w, dtype: torch.dtype = torch.float32):
    """The layer for a weight W (out, in): float (numpy or torch) -> Linear in `dtype`;
    a QMatrix -> QuantLinear, which computes on the quantized weights (dtype does not apply)."""
    if isinstance(w, QMatrix):
        return QuantLinear(w)
    return Linear(torch.from_numpy(w) if isinstance(w, np.ndarray) else w, dtype)


def pack_linears(linears: list) -> int:
    """Each float32 Linear among `linears` also kept in oneDNN's layout for several rows
    (`Linear.pack_rows`; others are left as they are); returns the bytes of the copies."""
    n = 0
    for lin in linears:
        if isinstance(lin, Linear):
            lin.pack_rows()
            n += lin.packed_bytes
    return n
