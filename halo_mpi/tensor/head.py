"""The output head by vocabulary slices (the embedding is read row by row: loading/embedding.py).

A rank holding rows [start, stop) of the head computes those logits; rank 0 gathers every slice
strictly, once per token (the logits decide the token), and concatenates them in vocabulary
order.
"""
from __future__ import annotations

import torch

from ..loading.parts import head_linear


class VocabSlice:
    """Rows [start, stop) of the output head: (T, dim) -> (T, stop - start) logits."""

    def __init__(self, store, start: int, stop: int, dtype: torch.dtype = torch.float32):
        self.start, self.stop = start, stop
        self.linear = head_linear(store, start, stop, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    @property
    def nbytes(self) -> int:
        return self.linear.nbytes
