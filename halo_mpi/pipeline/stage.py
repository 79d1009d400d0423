"""One rank's stage of the ring: its block of layers, a KV cache per sequence, and the ragged step
that runs several sequences' rows through the block at once.

    stage = Stage(Transformer.from_store(store, layers=plan.split[rank], ...), rank, plan)
    outs = stage.run([Feed(seq, step, h, span), ...])      # one step; h (T_i, dim) -> (T_i, dim)

A stage batches what is waiting at it: when several sequences' activations have arrived (the same
stage: the same block of layers), `take_step` picks up to --max-batch of them, one message per
sequence, and `Stage.run` puts their rows through the block in one `Transformer.ragged` call, so
each weight is read once per step whatever the batch (a decode step is memory-bound). Each
sequence keeps its own KV cache; its rows come out in its own message, as before.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from ..model.batch import StepLog
from ..model.llama import Attention, KVCache, Transformer
from ..net.framing import Kind, Message
from .plan import Plan


@dataclass
class Feed:
    """One sequence's rows in a stage's step."""
    seq: int                    # the sequence id (the job's index)
    step: int                   # position of its first row in the sequence
    h: torch.Tensor             # (T, dim) hidden states entering the block
    span: tuple[int, int]       # (prompt length, KV capacity), as the ring's headers carry them


def ragged_ready(model: Transformer) -> bool:
    """Whether every held block can run several sequences at once: the reference attention has a
    ragged path, a streamed one (--mem-budget) has not."""
    return all(type(b.attention) is Attention for b in model.blocks.values())


class Stage:
    def __init__(self, model: Transformer, rank: int, plan: Plan, loading=None):
        self.model, self.rank, self.plan = model, rank, plan
        self.loading = loading                   # BudgetedWeights under --mem-budget, else None
        self.caches: dict[int, KVCache] = {}     # seq -> its cache for this rank's layers
        # sequences one step may carry: --max-batch where the blocks have a ragged path, and no
        # more than can be in flight (one in flight: never batched, so never packed either)
        self.max_batch = min(plan.max_batch, plan.in_flight) if ragged_ready(model) else 1
        self.steps = StepLog()                   # each step's time and sequences

    def prepare_batches(self):
        """Float32 weights also kept in oneDNN's layout for several rows (model/linear.py: a
        batched step then costs about one row's; twice their memory), when this stage batches;
        never for streamed weights."""
        if self.max_batch > 1 and self.loading is None:
            self.model.pack_for_batches()

    def cache(self, seq: int, step: int, capacity: int) -> KVCache:
        """seq's cache, made at its step 0 for `capacity` tokens; it must hold `step` tokens."""
        cache = self.caches.get(seq)
        if cache is None and step == 0:
            cache = self.caches[seq] = self.model.new_cache(capacity)
        if cache is None or cache.pos != step:
            raise RuntimeError(f"rank {self.rank}: sequence {seq} sent step {step}, its cache "
                               f"holds {None if cache is None else cache.pos} tokens")
        return cache

    @torch.inference_mode()
    def run(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """This rank's block over the feeds' rows in one step: each (T_i, dim) -> (T_i, dim), every
        cache advanced by its rows. One feed goes the one-sequence way (its matrix-vector kernels,
        and the only way a streamed attention has)."""
        t0 = time.perf_counter()
        caches = [self.cache(f.seq, f.step, f.span[1]) for f in feeds]
        if len(feeds) == 1:
            outs = [self.model.layers(feeds[0].h, caches[0])]
            caches[0].pos += feeds[0].h.shape[0]
        else:
            lengths = [f.h.shape[0] for f in feeds]
            h = self.model.ragged(torch.cat([f.h for f in feeds]), caches, lengths)   # (N, dim)
            outs = list(h.split(lengths))                                          # (T_i, dim) each
        self.steps.add(time.perf_counter() - t0, len(feeds), sum(f.h.shape[0] == 1 for f in feeds))
        return outs

    def release(self, seq: int):
        self.caches.pop(seq, None)

    def step_stats(self) -> dict:
        """What this stage's steps carried: steps per batch size (keys as JSON has them), the median
        step (ms)."""
        return {"steps_by_batch": {str(b): n for b, n in sorted(self.steps.by_batch.items())},
                "step_ms_median": self.steps.recent_ms(len(self.steps.ms)) or 0.0}


def take_step(waiting: deque[Message], max_batch: int, prefill_rows: int) -> list[Message]:
    """The activations a stage's next step carries, taken out of `waiting` (arrival order): at
    most one message per sequence (its cache advances once a step, and its later messages wait
    their turn), up to max_batch sequences, and prompt chunks (several rows) up to prefill_rows
    rows in all beyond the first (a long prompt beside decoding sequences would slow every one
    of them). A finished sequence's empty message comes along without counting. Nothing past a
    message of another kind (STOP trails every activation) is taken."""
    taken, kept, seen = [], deque(), set()
    batch = prompt_rows = 0
    while waiting and waiting[0].kind == Kind.ACTIVATION:
        msg = waiting.popleft()
        rows = msg.payload.shape[0]
        fits = batch < max_batch and (rows <= 1 or not prompt_rows or prompt_rows + rows <= prefill_rows)
        if msg.seq in seen or (rows and not fits):
            kept.append(msg)
        else:
            taken.append(msg)
            batch += rows > 0
            prompt_rows += rows if rows > 1 else 0
        seen.add(msg.seq)
    waiting.extendleft(reversed(kept))
    return taken


def in_parts(items: list, size: int) -> list[list]:
    """items in consecutive parts of at most `size` (a step's cap)."""
    return [items[i:i + size] for i in range(0, len(items), size)]
