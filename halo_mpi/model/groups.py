"""Neuron groups: the partial SwiGLU MLP of a set of groups.

A group g of an MLP layer holds gate rows, up rows and down columns for the same slice of the
intermediate dimension, so `GroupMLP` over disjoint group sets sums to the full MLP output:
    partial_S(x) = down[:, S] @ (silu(gate[S] x) * up[S] x)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .linear import Linear, make_linear
from .quant import concat, from_records, records_dtype


class GroupMLP:
    """The SwiGLU MLP restricted to a set of neuron groups (all of them in the reference model)."""

    def __init__(self, groups: np.ndarray, ids=None, dtype: torch.dtype = torch.float32):
        # groups: (n, 3, group_size, dim) float as stored (see store/hdf5.py), or (n,) quantized
        # records with fields gate, up (gs, dim) and down (dim, gs); ids: their global group ids
        n = groups.shape[0]
        self.ids = np.arange(n) if ids is None else np.asarray(ids)
        self.quantized = records_dtype(groups) is not None
        if self.quantized:
            gs = groups.dtype["gate_codes"].shape[0]
            # gate and up fused so that a token costs one matmul: (2*n*gs, dim)
            self.gate_up = make_linear(concat([from_records(groups, "gate"), from_records(groups, "up")], 0))
            self.down = make_linear(from_records(groups, "down", axis=1))    # W_down[:, S]: (dim, n*gs)
        else:
            gs, dim = groups.shape[2:]
            w = torch.from_numpy(np.ascontiguousarray(groups))
            self.gate_up = Linear(torch.cat([w[:, 0].reshape(n * gs, dim), w[:, 1].reshape(n * gs, dim)]),
                                  dtype)
            self.down = Linear(w[:, 2].reshape(n * gs, dim).T, dtype)   # W_down[:, S]: (dim, n*gs)
        self.group_size, self.hidden = gs, n * gs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(T, dim) -> (T, dim), the sum of the held groups' contributions."""
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)   # (T, n*gs) each
        return self.down(F.silu(gate).mul_(up))

    def subset(self, x: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
        """The sum over the kept groups only (keep: (n,) bool), one matmul chain per run of
        consecutive kept groups, so skipped groups' weights are never read. Quantized weights
        cannot be sliced (the int4 kernel's packed layout interleaves K): there every weight is
        read and the skipped groups' activations are zeroed, the same sum at the full cost."""
        if self.quantized:
            gate, up = self.gate_up(x).split(self.hidden, dim=-1)              # (T, n*gs) each
            act = F.silu(gate).mul_(up).view(x.shape[0], -1, self.group_size)  # (T, n, gs)
            act *= torch.from_numpy(np.asarray(keep, dtype=np.float32))[None, :, None]
            return self.down(act.view(x.shape[0], -1))
        out = torch.zeros(x.shape[0], self.down.out_features)
        gs, H = self.group_size, self.hidden
        for a, b in runs(keep):
            gate = self.gate_up.out_slice(x, a * gs, b * gs)              # (T, (b-a)*gs)
            up = self.gate_up.out_slice(x, H + a * gs, H + b * gs)
            out += self.down.in_slice(F.silu(gate).mul_(up), a * gs, b * gs)
        return out

    def per_group(self, x: torch.Tensor) -> torch.Tensor:
        """Each group's own contribution: (T, dim) -> (T, n, dim). For importance statistics."""
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        act = (F.silu(gate) * up).view(x.shape[0], -1, self.group_size)          # (T, n, gs)
        down = self.down.weight().T.reshape(-1, self.group_size, x.shape[-1])     # (n, gs, dim)
        return torch.einsum("tng,ngd->tnd", act, down.float())

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def linears(self) -> list:
        """Its weight layers, in a fixed order (a loader streams and binds their tensors)."""
        return [self.gate_up, self.down]


def runs(keep: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) ranges of consecutive True entries."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))
