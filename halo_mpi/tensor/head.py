"""The output head by vocabulary slices (the embedding is read row by row: loading/embedding.py).

A rank holding rows [start, stop) of the head computes those logits; rank 0 gathers every slice
strictly, once per token (the logits decide the token), and concatenates them in vocabulary
order.
"""
from __future__ import annotations

import torch

from ..model.linear import make_linear
from ..model.quant import from_records, records_dtype


class VocabSlice:
    """Rows [start, stop) of the output head: (T, dim) -> (T, stop - start) logits."""

    def __init__(self, store, start: int, stop: int, dtype: torch.dtype = torch.float32):
        self.start, self.stop = start, stop
        rows = store.output_rows(start, stop)            # (n, dim) float, or (n,) records
        self.linear = make_linear(from_records(rows, "row") if records_dtype(rows) else rows, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    @property
    def nbytes(self) -> int:
        return self.linear.nbytes
