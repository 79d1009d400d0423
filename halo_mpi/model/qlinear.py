"""The matrix-vector kernel on quantized weights (QMatrix, model/quant.py) and quantized rows.

The kernel (`QuantLinear`) is torch's `_weight_int4pack_mm_for_cpu` with groups of 32. An 8-bit
code is split into its two nibbles, 16*hi + lo, each a 4-bit matrix with its own scale and offset,
stacked as one (2N, K) int4 matrix; the two halves of the result sum to x @ W.T. Measured on the
2-core dev machine (2026-11-30): 5-7x faster than float32 x @ W.T on cache-cold weights, but only
with bfloat16 activations (float32 or float16 inputs take a scalar path 15-30x slower). So
activations enter the kernel as bfloat16 and the result (bfloat16) is returned as float32; with
`exact=True` they stay float32 (slow) and the result equals x @ dequantize(W).T to float32
rounding (tests/test_quant.py).
"""
from __future__ import annotations

import numpy as np
import torch

from .quant import BITS, BLOCK, QMatrix, from_records, records_dtype

_TILE_N = 64         # the int4 kernel packs rows by tiles of 64: N is padded to a multiple
_PACK_BYTES = 4 << 20  # int32 codes packed at a time (tiles are independent, so slices pack alike):
                       # a bound on the build's transient memory (4096 rows of a 2048-wide matrix
                       # were 33 MB, most of a budgeted 1.1B rank's peak above its weights)


class QuantLinear:
    """y = x @ W.T on a QMatrix W (N, K), without expanding W to float: x (T, K) -> (T, N) float32."""

    exact = False     # class default; True computes in float32 (slow path, for tests)

    def __init__(self, m: QMatrix):
        self.dtype, self.out_features, self.in_features = m.dtype, *m.shape
        N, K = m.shape
        P = self.n_pad = -(-N // _TILE_N) * _TILE_N    # rows padded with weights 0
        if m.dtype == "q8_0":     # 16*hi + lo: two 4-bit matrices whose results sum to the 8-bit one
            halves = [(lambda c: c >> 4, 16 * m.scale, m.zero), (lambda c: c & 15, m.scale, 8 * m.scale)]
        else:
            halves = [(lambda c: c, m.scale, m.zero)]
        self.packed = torch.empty(len(halves) * P, K // 2, dtype=torch.uint8)   # (rows, K/2)
        scale_zero = np.zeros((K // BLOCK, len(halves) * P, 2), np.float32)     # (K/32, rows, 2)
        for h, (nibble, scale, zero) in enumerate(halves):
            step = max(_TILE_N, _PACK_BYTES // (4 * K) // _TILE_N * _TILE_N)
            for a in range(0, P, step):                # in slices: the int32 copy stays small
                b = min(a + step, P)
                block = np.full((b - a, K), 8, np.int32)                # code 8, scale 0: weight 0
                real = nibble(m.codes[a:min(b, N)])
                block[:len(real)] = real
                self.packed[h * P + a:h * P + b] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    torch.from_numpy(block), 1)
            scale_zero[:, h * P:h * P + N, 0] = scale.T
            scale_zero[:, h * P:h * P + N, 1] = zero.T
        # scale and offset per block and output row, in the activations' dtype (bfloat16-exact)
        self.scale_zero = torch.from_numpy(scale_zero).to(torch.bfloat16)
        self._scale_zero32 = None
        self._weight = None           # W as float32, made by weight() on demand

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact:
            if self._scale_zero32 is None:
                self._scale_zero32 = self.scale_zero.float()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.float().contiguous(), self.packed,
                                                           BLOCK, self._scale_zero32)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(),
                                                           self.packed, BLOCK, self.scale_zero)
        N, P = self.out_features, self.n_pad
        if self.dtype == "q8_0":                           # (T, 2P): hi half + lo half, in float32
            y = y.view(-1, 2, P).sum(1, dtype=torch.float32)
        else:
            y = y.float()
        return y if N == P else y[:, :N]

    def weight(self) -> torch.Tensor:
        """W (out, in) as float32: the kernel run exactly on the identity, once (kept afterwards:
        only calibration and importance statistics ask for it)."""
        if self._weight is None:
            exact, QuantLinear.exact = QuantLinear.exact, True
            try:
                self._weight = self(torch.eye(self.in_features)).T.contiguous()   # (K, N) -> (N, K)
            finally:
                QuantLinear.exact = exact
        return self._weight

    @property
    def nbytes(self) -> int:
        if self.packed is None:
            return 0
        return self.packed.numel() * self.packed.element_size() + self.scale_zero.numel() * 2

    def tensors(self) -> list[torch.Tensor]:
        """The kernel's tensors (a loader writes them out and binds them back)."""
        return [self.packed, self.scale_zero]

    def bind(self, tensors: list[torch.Tensor] | None):
        """Compute on these tensors (views into a load buffer), or on none (evicted)."""
        self.packed, self.scale_zero = (None, None) if tensors is None else tensors
        self._scale_zero32 = self._weight = None


class QuantRows:
    """Rows of a quantized (vocab, dim) table kept in their stored form (one record per row),
    dequantized on lookup: the embedding, at its stored size."""

    def __init__(self, records: np.ndarray, name: str):
        # records: (vocab,) structured array with the fields of one (1, dim) matrix `name`
        self.records, self.name = records, name

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:   # (T,) -> (T, dim)
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        return torch.from_numpy(from_records(self.records[idx], self.name).dequantize())

    def numel(self) -> int:
        """Parameters, as a float table's numel: vocab x dim."""
        per_byte = 8 // BITS[records_dtype(self.records)]
        return self.records.shape[0] * self.records.dtype[f"{self.name}_codes"].shape[-1] * per_byte

    @property
    def nbytes(self) -> int:
        return self.records.nbytes
