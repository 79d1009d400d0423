"""Quantized weights: q8_0 and q4 blocks, and the matrix-vector kernel that runs on them.

A quantized matrix stands for the float (N, K) matrix
    W[n, k] = (codes[n, k] - MID) * scale[n, k // 32] + zero[n, k // 32]
in blocks of BLOCK = 32 along K (the input dimension of the matmul), like llama.cpp's Q8_0 and
Q4_1. `scale` and `zero` are bfloat16 values (kept as float32 here, stored as their 16 bits):
torch's CPU int4 kernel takes its scales in bfloat16, and choosing them bfloat16 from the start
means the kernel computes with exactly the weights that `dequantize` gives (no second rounding).
- q8_0: 8-bit codes, MID 128, zero 0 (symmetric, one scale per block): 1.0625 bytes/weight;
- q4:   4-bit codes, MID 8, a scale and an offset per block (as Q4_1): 0.625 bytes/weight.
The quantizers are min/max rules: re-quantizing Q4_1's dequantized values to q4 finds its codes
again (its scale and offset are only rounded to bfloat16), so a GGUF's Q4_1 is not rounded twice.

This module is numpy only (the store uses it); the kernel that computes on these matrices is
model/qlinear.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
QUANT_DTYPES = ("q8_0", "q4")
BITS = {"q8_0": 8, "q4": 4}


# ---------------------------------------------------------------------------------------------
# bfloat16 values held as float32, and their 16-bit storage

def bf16_round(x: np.ndarray, up: bool = False) -> np.ndarray:
    """float32 -> the nearest bfloat16 value (or the next one away from zero with up=True),
    as float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    if up:
        cut = bits & np.uint32(0xFFFF0000)
        out = cut.view(np.float32)
        bump = np.abs(out) < np.abs(x)
        cut = np.where(bump, cut + np.uint32(0x10000), cut)
    else:   # round half to even on the 16 dropped bits
        cut = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return cut.astype(np.uint32).view(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16-exact float32 values -> their 16 bits (uint16), as stored."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------
# quantized matrices

@dataclass
class QMatrix:
    """A (N, K) float matrix in blocks of 32 along K; see the module docstring."""
    dtype: str               # "q8_0" or "q4"
    codes: np.ndarray        # (N, K) uint8, 0 .. 2**bits - 1
    scale: np.ndarray        # (N, K // 32) float32, bfloat16-exact
    zero: np.ndarray         # (N, K // 32) float32, bfloat16-exact (all 0 for q8_0)

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    @property
    def mid(self) -> int:
        return 1 << (BITS[self.dtype] - 1)

    def take_rows(self, index: np.ndarray) -> QMatrix:
        """The matrix of rows W[index] (the blocks run along rows, so rows move whole)."""
        return QMatrix(self.dtype, self.codes[index], self.scale[index], self.zero[index])

    def dequantize(self) -> np.ndarray:       # (N, K) float32
        N, K = self.codes.shape
        c = self.codes.reshape(N, K // BLOCK, BLOCK).astype(np.float32) - self.mid
        return (c * self.scale[..., None] + self.zero[..., None]).reshape(N, K)


def quantize(w: np.ndarray, dtype: str) -> QMatrix:
    """(N, K) float32 -> QMatrix by the min/max rule of llama.cpp's Q8_0 / Q4_1 (K % 32 == 0)."""
    w = np.asarray(w, dtype=np.float32)
    N, K = w.shape
    if K % BLOCK:
        raise ValueError(f"{dtype} needs rows of a multiple of {BLOCK} values, not {K}")
    b = w.reshape(N, K // BLOCK, BLOCK)                                   # (N, K/32, 32)
    if dtype == "q8_0":
        amax = np.abs(b).max(axis=-1)
        scale = bf16_round(amax / 127, up=True)        # up: |w / scale| <= 127, never clipped
        zero = np.zeros_like(scale)
        safe = np.where(scale > 0, scale, 1)
        codes = np.clip(np.rint(b / safe[..., None]), -127, 127) + 128
    elif dtype == "q4":
        lo, hi = b.min(axis=-1), b.max(axis=-1)
        scale = bf16_round((hi - lo) / 15, up=True)
        zero = bf16_round(lo + 8 * scale)              # w = (c - 8) * scale + zero
        safe = np.where(scale > 0, scale, 1)
        codes = np.clip(np.rint((b - zero[..., None]) / safe[..., None]) + 8, 0, 15)
    else:
        raise ValueError(f"unknown quantized dtype {dtype!r}; choose one of {QUANT_DTYPES}")
    return QMatrix(dtype, codes.astype(np.uint8).reshape(N, K), scale, zero)


def concat(parts: list[QMatrix], axis: int) -> QMatrix:
    """Stack along N (axis 0: more outputs) or K (axis 1: more inputs; blocks stay whole)."""
    return QMatrix(parts[0].dtype, *(np.concatenate([getattr(p, f) for p in parts], axis=axis)
                                     for f in ("codes", "scale", "zero")))


# ---------------------------------------------------------------------------------------------
# storage: a matrix as fields of a numpy record (one HDF5 compound element per group or row)

def record_fields(name: str, shape: tuple[int, int], dtype: str) -> list[tuple]:
    """The record fields of one (N, K) matrix (np.dtype(sum of these lists) is a record type):
    codes (4-bit ones two per byte along K), then the 16 bits of each block's scale (and offset)."""
    N, K = shape
    per_byte = 8 // BITS[dtype]
    fields = [(f"{name}_codes", np.uint8, (N, K // per_byte)), (f"{name}_scale", np.uint16, (N, K // BLOCK))]
    if dtype == "q4":
        fields.append((f"{name}_zero", np.uint16, (N, K // BLOCK)))
    return fields


def to_records(recs: np.ndarray, name: str, w: np.ndarray):
    """Quantize w (n, N, K), one (N, K) matrix per record element, into the fields `name_*` of
    recs (n,), whose dtype says which quantization."""
    dtype = records_dtype(recs)
    n, N, K = w.shape
    m = quantize(w.reshape(n * N, K), dtype)
    codes = m.codes
    if dtype == "q4":                                     # two codes per byte, low nibble first
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    recs[f"{name}_codes"] = codes.reshape(n, N, -1)
    recs[f"{name}_scale"] = bf16_bits(m.scale).reshape(n, N, -1)
    if dtype == "q4":
        recs[f"{name}_zero"] = bf16_bits(m.zero).reshape(n, N, -1)


def from_records(recs: np.ndarray, name: str, axis: int = 0) -> QMatrix:
    """The matrices `name` of the record elements recs (n,), concatenated along N (axis 0) or
    K (axis 1) as `concat` does, without a Python loop over the elements."""
    dtype = records_dtype(recs)
    codes = np.asarray(recs[f"{name}_codes"])                      # (n, N, K or K/2)
    if dtype == "q4":                                               # (n, N, K/2) -> (n, N, K)
        codes = np.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:2], -1)
    scale = from_bf16_bits(recs[f"{name}_scale"])                  # (n, N, K/32)
    zero = from_bf16_bits(recs[f"{name}_zero"]) if dtype == "q4" else np.zeros_like(scale)

    def join(a: np.ndarray) -> np.ndarray:                          # (n, N, k) -> one matrix
        if axis == 0:
            return a.reshape(-1, a.shape[-1])                       # (n*N, k)
        return a.transpose(1, 0, 2).reshape(a.shape[1], -1)         # (N, n*k)
    return QMatrix(dtype, join(codes), join(scale), join(zero))


def records_dtype(recs: np.ndarray) -> str | None:
    """"q8_0" / "q4" for quantized records, None for a plain float array."""
    names = getattr(recs.dtype, "names", None)
    if not names:
        return None
    return "q4" if any(n.endswith("_zero") for n in names) else "q8_0"
