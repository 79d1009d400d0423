"""The output head by vocabulary slices (the embedding is read row by row: loading/embedding.py).

A rank holding rows [start, stop) of the head computes those logits; rank 0 gathers every slice
strictly, once per token (the logits decide the token), and concatenates them in vocabulary
order.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..loading.parts import head_linear
from ..net.devices import ClusterSpec
from .placement import vocab_slices


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


class HeadRows:
    """Which member holds which rows of the head (`vocab`: rank -> [start, stop)) and rank 0's own
    slice (`own`). A speed re-plan splits the rows anew over the members (`split`); rank 0 reads
    its new slice at once (`read`) and holds it from the plan's step on (`switch`)."""

    def __init__(self, vocab: list[tuple[int, int]], own: VocabSlice | None,
                 load: Callable[[int, int], VocabSlice | None], members: list[int]):
        self.vocab, self.own, self.load, self.members = vocab, own, load, members

    def split(self, cluster: ClusterSpec) -> list[tuple[int, int]] | None:
        """The rows in proportion to the cluster's speeds, or None where that moves none."""
        new = vocab_slices(cluster, self.vocab[-1][1], self.members)
        return None if new == self.vocab else new

    def describe(self, vocab: list[tuple[int, int]]) -> str:
        return "head rows: " + ", ".join(f"rank {r} {b - a}" for r, (a, b) in enumerate(vocab)
                                         if r in self.members)

    def gaining(self, vocab: list[tuple[int, int]]) -> set[int]:
        """The workers whose rows change under `vocab` (they read theirs and say READY)."""
        return {r for r in self.members if r and vocab[r] != self.vocab[r]}

    def read(self, vocab: list[tuple[int, int]]) -> VocabSlice | None:
        return self.load(*vocab[0]) if vocab[0] != self.vocab[0] else self.own

    def switch(self, vocab: list[tuple[int, int]], own: VocabSlice | None):
        self.vocab, self.own = vocab, own
