"""The embedding read row by row from the store, never held whole.

Rank 0 of tensor mode, the first pipeline stage and any rank under a memory budget read the rows
of the tokens they embed (one contiguous read of a row per token, ~5 us from the page cache).
"""
from __future__ import annotations

import numpy as np
import torch

from .quant import from_records, records_dtype


class StoreEmbedding:
    """Token ids (T,) -> their embedding rows (T, dim), read from the store as they are needed."""

    def __init__(self, store):
        self.store = store

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.store.embedding_rows(np.asarray(tokens, dtype=np.int64))
        return torch.from_numpy(from_records(rows, "row").dequantize() if records_dtype(rows) else rows)
