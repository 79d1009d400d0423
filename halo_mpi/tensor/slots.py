"""The sequences of a member's step: each has a slot (rank 0 numbers them: 0 for a lone session,
0 .. --max-batch - 1 in batched steps), whose K/V caches its attention groups keep
(tensor/attention.py). A batched STEP packs every sequence's slot, position and token ids in one
int32 payload; the model's own caches of them hold positions only.
"""
from __future__ import annotations

import numpy as np
import torch

from ..model.llama import KVCache, last_rows
from ..net.framing import Message

# STEP flags (the message's layer field): REPLAY: K/V only (no logits); BATCH: several sequences
# (the payload packs them: pack_feeds), else one, the one of slot `seq`
LAST_ONLY, DECODING, REPLAY, BATCH = 1, 2, 4, 8


def pack_feeds(feeds: list[tuple[int, int, list[int]]]) -> np.ndarray:
    """A batched STEP's payload from (slot, position, token ids) per sequence: (1 + 3B + N, 1)
    int32, [B, (slot, pos, n) x B, every sequence's ids in order]."""
    head = [len(feeds)] + [v for slot, pos, ids in feeds for v in (slot, pos, len(ids))]
    return np.array(head + [t for _, _, ids in feeds for t in ids], np.int32).reshape(-1, 1)


def unpack_feeds(payload: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """pack_feeds' (slot, position, ids) per sequence."""
    flat = payload.reshape(-1)
    n = int(flat[0])
    spans = flat[1:1 + 3 * n].reshape(n, 3)                   # (B, 3): slot, pos, tokens
    ends = 1 + 3 * n + np.cumsum(spans[:, 2])
    return [(int(slot), int(pos), flat[end - k:end]) for (slot, pos, k), end in zip(spans, ends)]


class Sequences:
    """A member's view of the step's sequences: their slots in row order (whose caches its
    attention groups use) and the model's cache of each slot's sequence, positions only (its
    attention is MemberAttention, whose K/V live with the held groups: n_kv 0 here)."""

    def __init__(self, member):
        self.member = member                   # (its model is set after the member is made)
        self.slots: list[int] = [0]
        self.caches: dict[int, KVCache] = {}

    def at(self, slot: int, pos: int) -> KVCache:
        """Slot's cache, at position pos."""
        cache = self.caches.get(slot)
        if cache is None:
            model = self.member.model
            cache = self.caches[slot] = model.new_cache(model.args.max_seq_len)
        cache.pos = pos
        return cache

    def layers(self, m: Message) -> tuple[torch.Tensor, object]:
        """A STEP's sequences through the model's layers: h (N, dim), and the rows whose logits
        rank 0 wants (each sequence's last; one sequence's every row without LAST_ONLY)."""
        model = self.member.model
        if not m.layer & BATCH:
            self.slots = [m.seq]
            tokens = torch.from_numpy(m.payload.reshape(-1).astype(np.int64))
            h = model.layers(model.embed(tokens), self.at(m.seq, m.pos))
            return h, slice(-1, None) if m.layer & LAST_ONLY else slice(None)
        feeds = unpack_feeds(m.payload)
        if len(feeds) > 1:                      # (as rank 0: TensorBatch.step)
            self.member.pack_for_batches()
        self.slots = [slot for slot, _, _ in feeds]
        caches = [self.at(slot, pos) for slot, pos, _ in feeds]
        lengths = [len(ids) for _, _, ids in feeds]
        tokens = torch.from_numpy(np.concatenate([ids for _, _, ids in feeds]).astype(np.int64))
        return model.ragged(model.embed(tokens), caches, lengths), last_rows(lengths)

