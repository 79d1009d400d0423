"""Pipeline mode (MDI-LLM): contiguous blocks of layers on a ring of ranks, with recurrent
pipeline parallelism over several sequences.

    mpiexec -n 4 halo-mpi generate --parallel pipeline --prompt-file prompts.txt --num-sequences 8

Rank 0 holds the embedding, the first block of layers and the head; rank r > 0 holds the r-th
block (pipeline/split.py chooses the blocks, pipeline/plan.py makes the plan). A sequence's
hidden states go 0 -> 1 -> ... -> N-1 and back to 0: rank 0 embeds a token and runs its block,
each next rank runs its own, the last sends the final hidden state home, where rank 0 applies
the head, samples the next token and sends it round again (pipeline/conductor.py). With S
sequences in flight every rank works on different ones at once; each rank keeps one KV cache per
sequence and runs the sequences waiting at it together, up to --max-batch in one ragged step
(pipeline/stage.py). A sequence that ends (stop token or its token budget) leaves the ring; the
others go on, and the next waiting job takes its place (`Conductor.drive`: jobs from a list, or
from a server's queue). A `RingSession` runs one sequence at a time through the ring instead
(teacher-forced perplexity).

Messages (net/framing.py's Kind), identified by sequence (`seq`, the job's index) and `step`:
    ACTIVATION  (T, dim) hidden states of tokens step .. step+T-1 of `seq`, entering the block
                that starts at `layer`; layer = n_layers: home to rank 0's head (T = 1);
                T = 0: the sequence has finished, free its KV caches. The header also carries
                the sequence's prompt length (`pos`) and KV capacity, prompt + new tokens
                (`plan`), so a stage needs no list of the prompts (a server's come as they come)
    STOP        rank 0 -> 1 -> ... -> N-1 along the ring, so it trails every activation on a link
    DONE        each rank -> rank 0: the rank's statistics (JSON), its last message
A batched step still sends one message per sequence: a decode message stays one row (2.3 kB in
float32, as unbatched), so a lost segment on a lossy link holds up no more than it did, and a
stage needs no bookkeeping of which sequences travelled together.
A prompt's prefill goes round once, in chunks of --prefill-chunk tokens; then one token per hop.
Every rank's receives are posted ahead (net/transport.py) and waiting sleeps between tests.

The model code knows nothing of this: a stage is `Transformer.from_store(store, layers=...)`.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager

import numpy as np
import torch

from ..model.llama import Transformer
from ..net.framing import Kind, Message, json_payload
from ..stats import cpu_seconds, peak_rss_mb, rss_mb
from .plan import Plan
from .stage import Feed, Stage, take_step

WAIT = 0.05             # longest single wait for a message before checking for cancellation, s
NO_ROWS = np.zeros((0, 1), np.float32)
DRAIN = 256             # most messages one poll gathers (a bound, far above any --max-batch)


# ---------------------------------------------------------------------------------------------
# timing and cancellation

class Clock:
    """Wall time since the ring started, and the part of it spent computing."""

    def __init__(self):
        self.start, self.compute_s = time.perf_counter(), 0.0

    @contextmanager
    def compute(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.compute_s += time.perf_counter() - t0

    def wall(self) -> float:
        return time.perf_counter() - self.start


class Cancelled(Exception):
    """Another rank (a thread of the local twin) failed: stop this one too."""


def check(cancelled: threading.Event | None):
    if cancelled is not None and cancelled.is_set():
        raise Cancelled("another rank failed")


# ---------------------------------------------------------------------------------------------
# the ring: routing between neighbours (a ring of one rank loops back in memory)

class Ring:
    def __init__(self, transport, rank: int, size: int):
        self.transport, self.rank, self.size = transport, rank, size
        self.next = (rank + 1) % size
        self.is_last = rank == size - 1
        self.wait_s = 0.0
        self._loopback: deque[Message] = deque()

    def send(self, dest: int, kind: Kind, step: int, layer: int, payload: np.ndarray, seq: int = 0,
             span: tuple[int, int] = (0, 0)):
        """span: the sequence's (prompt length, KV capacity), in the header's pos and plan fields."""
        prompt_len, capacity = span
        if dest == self.rank:
            self._loopback.append(Message(dest, kind, step, layer, payload, time.perf_counter(), seq,
                                          capacity, prompt_len))
        else:
            self.transport.send(dest, kind, step, layer, payload, seq=seq, plan=capacity, pos=prompt_len)

    def poll(self, timeout: float) -> list[Message]:
        """Arrived messages in arrival order, waiting up to timeout (sleeping) for the first; then
        every other one already here: the MPI transport keeps one receive posted per peer, so a
        single poll hands over at most one message from the previous stage, and a stage would
        never see the several sequences waiting for it."""
        if self._loopback:
            got = list(self._loopback)
            self._loopback.clear()
        elif self.transport is None:
            if timeout == 0.0:          # a look between rounds (a prompt still being fed)
                return []
            raise RuntimeError("a one-rank ring has nothing in flight but is asked to wait")
        else:
            t0 = time.perf_counter()
            got = self.transport.poll(timeout)
            self.wait_s += time.perf_counter() - t0
        while self.transport is not None and got and len(got) < DRAIN:
            more = self.transport.poll(0.0)
            if not more:
                break
            got += more
        return got

    def pass_on(self, plan: Plan, seq: int, step: int, h: torch.Tensor, span: tuple[int, int]):
        """A block's output (T, dim) goes to the next stage; from the last stage, only the newest
        token's state goes home, and only once the whole prompt is in (a next token is due).
        span: the sequence's (prompt length, KV capacity)."""
        T = h.shape[0]
        if not self.is_last:
            self.send(self.next, Kind.ACTIVATION, step, plan.split[self.next].start, h.numpy(), seq, span)
        elif step + T >= span[0]:
            self.send(0, Kind.ACTIVATION, step + T - 1, plan.n_layers, h[-1:].numpy(), seq, span)

    def release(self, plan: Plan, seq: int):
        """Tell the next stage that seq has finished (the last stage tells no one)."""
        if not self.is_last:
            self.send(self.next, Kind.ACTIVATION, 0, plan.split[self.next].start,
                      np.zeros((0, plan.dim), np.float32), seq)


# ---------------------------------------------------------------------------------------------
# the end of a run

def stop_ring(ring: Ring, cancelled=None) -> list[dict]:
    """STOP goes round behind everything else; every other rank answers DONE with its stats."""
    if ring.size == 1:
        return []
    ring.send(1, Kind.STOP, 0, 0, NO_ROWS)
    stats: dict[int, dict] = {}
    while len(stats) < ring.size - 1:
        for msg in ring.poll(WAIT):
            if msg.kind != Kind.DONE:
                raise RuntimeError(f"rank 0: {msg.kind.name} from rank {msg.source} after STOP")
            stats[msg.source] = msg.json()
        check(cancelled)
    return [stats[r] for r in sorted(stats)]


# ---------------------------------------------------------------------------------------------
# ranks 1..N-1: run the block on whatever arrives

def serve(ring: Ring, stage: Stage, clock: Clock, cancelled=None):
    """A stage's loop: until STOP, run the activations waiting here through the block, several
    sequences a step (stage.py's take_step), and pass each on."""
    waiting: deque[Message] = deque()
    while True:
        waiting.extend(ring.poll(0.0 if waiting else WAIT))
        if waiting and waiting[0].kind == Kind.STOP:
            if not ring.is_last:
                ring.send(ring.next, Kind.STOP, 0, 0, NO_ROWS)
            ring.send(0, Kind.DONE, 0, 0, json_payload(rank_stats(ring, stage, clock)))
            return
        if waiting and waiting[0].kind != Kind.ACTIVATION:
            msg = waiting[0]
            raise RuntimeError(f"rank {ring.rank}: unexpected {msg.kind.name} from rank {msg.source}")
        if waiting:
            run_step(ring, stage, clock, take_step(waiting, stage.max_batch, stage.plan.chunk))
        check(cancelled)


def run_step(ring: Ring, stage: Stage, clock: Clock, msgs: list[Message]):
    """One step of the block over the messages' sequences; a finished one's caches freed."""
    feeds = []
    for msg in msgs:
        if msg.payload.shape[0] == 0:          # the sequence has finished
            stage.release(msg.seq)
            ring.release(stage.plan, msg.seq)
        else:
            feeds.append(Feed(msg.seq, msg.step, torch.from_numpy(msg.payload), (msg.pos, msg.plan)))
    if not feeds:
        return
    with clock.compute():
        outs = stage.run(feeds)
    for feed, h in zip(feeds, outs):
        ring.pass_on(stage.plan, feed.seq, feed.step, h, feed.span)              # h: (T, dim)


def held_parameters(model: Transformer) -> int:
    """Weights this rank holds: its blocks' matrices and norms, and the embedding/head if any."""
    def linear(lin):
        return 0 if lin is None else lin.in_features * lin.out_features
    n = sum(sum(linear(lin) for lin in b.attention.linears() + b.feed_forward.linears())
            + b.attn_norm.numel() + b.ffn_norm.numel() for b in model.blocks.values())
    n += linear(model.output) + (0 if model.embedding is None else model.embedding.numel())
    return n + (0 if model.norm is None else model.norm.numel())


def rank_stats(ring: Ring, stage: Stage, clock: Clock) -> dict:
    wall, layers = clock.wall(), stage.plan.split[ring.rank]
    return {"rank": ring.rank, "layers": [layers.start, layers.stop], "n_layers": len(layers),
            "embedding_and_head": ring.rank == 0, "parameters": held_parameters(stage.model),
            "weight_bytes": stage.model.weight_bytes() + (stage.loading.buffer_bytes if stage.loading else 0),
            "packed_bytes": stage.model.packed_bytes(), "max_batch": stage.max_batch, **stage.step_stats(),
            **({"loading": stage.loading.stats()} if stage.loading else {}),
            "compute_s": clock.compute_s, "wait_s": ring.wait_s, "wall_s": wall,
            "busy_share": clock.compute_s / wall if wall else 0.0, "peak_rss_mb": peak_rss_mb(),
            "cpu_s": cpu_seconds(), "threads": torch.get_num_threads(),
            "rss_mb": rss_mb(),
            "messages_sent": ring.transport.stats.sent if ring.transport else 0,
            "messages_received": ring.transport.stats.received if ring.transport else 0}
