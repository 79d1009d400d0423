"""The output head by vocabulary slices, and the embedding read row by row from the store.

A rank holding rows [start, stop) of the head computes those logits; rank 0 gathers every slice
strictly, once per token (the logits decide the token), and concatenates them in vocabulary
order. The embedding table is never held whole: rank 0 reads the rows of the tokens it embeds
(one contiguous read of a row per token, ~5 us from the page cache).
"""
from __future__ import annotations

import numpy as np
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


class StoreEmbedding:
    """Token ids (T,) -> their embedding rows (T, dim), read from the store as they are needed."""

    def __init__(self, store):
        self.store = store

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.store.embedding_rows(np.asarray(tokens, dtype=np.int64))
        return torch.from_numpy(from_records(rows, "row").dequantize() if records_dtype(rows) else rows)
