"""Pipeline mode (MDI-LLM): contiguous blocks of layers on a ring of ranks, with recurrent
pipeline parallelism over several sequences.

    mpiexec -n 4 halo-mpi generate --parallel pipeline --prompt-file prompts.txt --num-sequences 8

Rank 0 holds the embedding, the first block of layers and the head; rank r > 0 holds the r-th
block (pipeline/split.py chooses the blocks, pipeline/plan.py makes the plan). A sequence's
hidden states go 0 -> 1 -> ... -> N-1 and back to 0: rank 0 embeds a token and runs its block,
each next rank runs its own, the last sends the final hidden state home, where rank 0 applies
the head, samples the next token and sends it round again. With S sequences in flight every rank
works on a different one at once; each rank keeps one KV cache per sequence and takes whichever
message arrives next. A sequence that ends (stop token or its token budget) leaves the ring; the
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
A prompt's prefill goes round once, in chunks of --prefill-chunk tokens; then one token per hop.
Every rank's receives are posted ahead (net/transport.py) and waiting sleeps between tests.

The model code knows nothing of this: a stage is `Transformer.from_store(store, layers=...)`.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.generate import GenerationResult, Sampler, pick_token
from ..model.jobs import Finished, Job, JobList, JobSource
from ..model.llama import KVCache, Transformer
from ..net.framing import Kind, Message, json_payload
from ..net.launch import responsive
from ..stats import cpu_seconds, peak_rss_mb, rss_mb
from .plan import Plan

WAIT = 0.05             # longest single wait for a message before checking for cancellation, s
NO_ROWS = np.zeros((0, 1), np.float32)


# ---------------------------------------------------------------------------------------------
# one rank's stage: its block of layers and a KV cache per sequence

class Stage:
    def __init__(self, model: Transformer, rank: int, plan: Plan, loading=None):
        self.model, self.rank, self.plan = model, rank, plan
        self.loading = loading                   # BudgetedWeights under --mem-budget, else None
        self.caches: dict[int, KVCache] = {}     # seq -> its cache for this rank's layers

    @torch.inference_mode()
    def run(self, seq: int, step: int, h: torch.Tensor, capacity: int) -> torch.Tensor:
        """This rank's block on tokens step .. step+T-1 of seq: (T, dim) -> (T, dim); the
        sequence's KV cache (`capacity` tokens) is made at its step 0."""
        cache = self.caches.get(seq)
        if cache is None and step == 0:
            cache = self.caches[seq] = self.model.new_cache(capacity)
        if cache is None or cache.pos != step:
            raise RuntimeError(f"rank {self.rank}: sequence {seq} sent step {step}, its cache "
                               f"holds {None if cache is None else cache.pos} tokens")
        h = self.model.layers(h, cache)
        cache.pos += h.shape[0]
        return h

    def release(self, seq: int):
        self.caches.pop(seq, None)


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
        """Arrived messages in arrival order, waiting up to timeout (sleeping) for the first."""
        if self._loopback:
            got = list(self._loopback)
            self._loopback.clear()
            return got + (self.transport.poll(0.0) if self.transport else [])
        if self.transport is None:
            raise RuntimeError("a one-rank ring has nothing in flight but is asked to wait")
        t0 = time.perf_counter()
        got = self.transport.poll(timeout)
        self.wait_s += time.perf_counter() - t0
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
# rank 0: sequences enter, the head samples, sequences leave

@dataclass
class Sequence:
    job: Job
    sampler: Sampler
    result: GenerationResult
    started_at: float
    token_times: list[float] = field(default_factory=list)   # perf_counter of each token
    logits: list[torch.Tensor] = field(default_factory=list)  # (vocab,) per sample, keep_logits

    @property
    def index(self) -> int:
        return self.job.index

    @property
    def next_pos(self) -> int:
        """Position of the newest token, whose state comes home next."""
        return len(self.job.ids) + len(self.result.tokens) - 1

    @property
    def span(self) -> tuple[int, int]:
        """(prompt length, KV capacity) as the ring's messages carry them."""
        return len(self.job.ids), self.job.max_len


class Conductor:
    """Rank 0's duties besides its block: start sequences, sample from the head, retire them.
    keep_logits: each sequence keeps the logits of every sample (tests)."""

    def __init__(self, ring: Ring, stage: Stage, clock: Clock, on_finish: Finished | None = None,
                 keep_logits: bool = False):
        self.ring, self.stage, self.clock, self.plan = ring, stage, clock, stage.plan
        self.on_finish, self.keep_logits = on_finish, keep_logits
        self.active: dict[int, Sequence] = {}
        self.done: dict[int, Sequence] = {}

    def drive(self, source: JobSource, cancelled=None):
        """Up to the plan's in-flight count of jobs at once, until the source is exhausted and
        every job has finished; a finishing job frees its slot for the next."""
        while True:
            started = False
            while len(self.active) < self.plan.in_flight:
                job = source.take(0.0 if self.active or started else WAIT)
                if job is None:
                    break
                if job.cancelled():
                    job.result = GenerationResult(len(job.ids), stopped_by="cancelled")
                    self.on_finish and self.on_finish(job)
                    continue
                self.start(job)
                started = True
            if not self.active:
                if source.exhausted():
                    return
                responsive()        # idle, not stuck in MPI (net/launch.py DeathWatch)
                continue
            for msg in self.ring.poll(0.0 if started else WAIT):
                self.on_return(msg)
            check(cancelled)

    def start(self, job: Job):
        """Prefill: the prompt goes round once, chunk by chunk, behind this rank's block."""
        seq = self.active[job.index] = Sequence(job, job.sampler(), GenerationResult(len(job.ids)),
                                                time.perf_counter())
        ids, model = torch.tensor(job.ids), self.stage.model
        for p in range(0, len(job.ids), self.plan.chunk):
            with self.clock.compute():
                h = self.stage.run(job.index, p, model.embed(ids[p:p + self.plan.chunk]), seq.span[1])
            self.ring.pass_on(self.plan, job.index, p, h, seq.span)                 # h: (T, dim)

    def on_return(self, msg: Message):
        """The final hidden state of a sequence's newest token: sample, then send the next round."""
        seq = self.active.get(msg.seq)
        if msg.kind != Kind.ACTIVATION or seq is None or msg.step != seq.next_pos:
            raise RuntimeError(f"rank 0: unexpected {msg.kind.name} from rank {msg.source} for "
                               f"sequence {msg.seq}, step {msg.step}")
        with self.clock.compute(), torch.inference_mode():
            logits = self.stage.model.head(torch.from_numpy(msg.payload))[0]   # (1, dim) -> (vocab,)
        self._record(seq, logits)
        job = seq.job
        if job.max_new == 0:
            return self.finish(seq, "max-new-tokens")
        with torch.inference_mode():
            verdict = pick_token(seq.sampler, logits, job.stop_ids, job.on_token, seq.result)
        if verdict is not None:
            return self.finish(seq, verdict)
        token = seq.result.tokens[-1]
        if len(seq.result.tokens) >= job.max_new:
            return self.finish(seq, "max-new-tokens")
        with self.clock.compute():
            h = self.stage.run(seq.index, seq.next_pos, self.stage.model.embed(torch.tensor([token])),
                               seq.span[1])
        self.ring.pass_on(self.plan, seq.index, seq.next_pos, h, seq.span)

    def _record(self, seq: Sequence, logits: torch.Tensor):
        now = time.perf_counter()
        if seq.token_times:
            seq.result.decode_s.append(now - seq.token_times[-1])
        else:
            seq.result.prefill_s = now - seq.started_at      # time to the first token
        seq.token_times.append(now)
        if self.keep_logits:
            seq.logits.append(logits.clone())

    def finish(self, seq: Sequence, reason: str):
        seq.result.stopped_by = reason
        self.stage.release(seq.index)
        self.ring.release(self.plan, seq.index)
        self.done[seq.index] = self.active.pop(seq.index)
        seq.job.result = seq.result
        if self.on_finish:
            self.on_finish(seq.job)


def conduct(ring: Ring, stage: Stage, clock: Clock, jobs: list[Job], on_finish: Finished | None = None,
            cancelled=None, keep_logits: bool = False) -> list[Sequence]:
    """Rank 0's loop over a fixed list of jobs (indexed 0..n-1): every sequence, in job order."""
    c = Conductor(ring, stage, clock, on_finish, keep_logits)
    c.drive(JobList(jobs), cancelled)
    return [c.done[job.index] for job in jobs]


class RingSession:
    """One sequence at a time through the ring, on rank 0: `prefill` and `decode` send its tokens
    round and wait for its state to come home (teacher-forced perplexity; model/generate.py's
    session calls)."""

    def __init__(self, ring: Ring, stage: Stage, clock: Clock, seq: int, max_len: int):
        self.ring, self.stage, self.clock, self.seq, self.capacity = ring, stage, clock, seq, max_len
        self.prompt_len = self.pos = 0

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.prompt_len = len(ids)
        tokens = torch.tensor(ids)
        for p in range(0, len(ids), self.stage.plan.chunk):
            self._send(p, tokens[p:p + self.stage.plan.chunk])
        return self._home()

    def decode(self, token: int) -> torch.Tensor:
        self._send(self.pos, torch.tensor([token]))
        return self._home()

    def _send(self, step: int, tokens: torch.Tensor):
        with self.clock.compute():
            h = self.stage.run(self.seq, step, self.stage.model.embed(tokens), self.capacity)  # (T, dim)
        self.pos = step + tokens.shape[0]
        self.ring.pass_on(self.stage.plan, self.seq, step, h, (self.prompt_len, self.capacity))

    def _home(self) -> torch.Tensor:
        """The logits (vocab,) of the newest token, once its state has come round."""
        while True:
            for msg in self.ring.poll(WAIT):
                if msg.kind != Kind.ACTIVATION or msg.seq != self.seq or msg.step != self.pos - 1:
                    raise RuntimeError(f"rank 0: unexpected {msg.kind.name} from rank {msg.source} "
                                       f"for sequence {msg.seq}, step {msg.step}")
                with self.clock.compute(), torch.inference_mode():
                    return self.stage.model.head(torch.from_numpy(msg.payload))[0]

    def close(self):
        self.stage.release(self.seq)
        self.ring.release(self.stage.plan, self.seq)


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
    """A stage's loop: until STOP, run every activation through the block and pass it on."""
    while True:
        for msg in ring.poll(WAIT):
            if msg.kind == Kind.STOP:
                if not ring.is_last:
                    ring.send(ring.next, Kind.STOP, 0, 0, NO_ROWS)
                ring.send(0, Kind.DONE, 0, 0, json_payload(rank_stats(ring, stage, clock)))
                return
            if msg.kind != Kind.ACTIVATION:
                raise RuntimeError(f"rank {ring.rank}: unexpected {msg.kind.name} from rank {msg.source}")
            run_activation(ring, stage, clock, msg)
        check(cancelled)


def run_activation(ring: Ring, stage: Stage, clock: Clock, msg: Message):
    if msg.payload.shape[0] == 0:          # the sequence has finished
        stage.release(msg.seq)
        ring.release(stage.plan, msg.seq)
        return
    with clock.compute():
        h = stage.run(msg.seq, msg.step, torch.from_numpy(msg.payload), capacity=msg.plan)  # (T, dim)
    ring.pass_on(stage.plan, msg.seq, msg.step, h, span=(msg.pos, msg.plan))


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
            **({"loading": stage.loading.stats()} if stage.loading else {}),
            "compute_s": clock.compute_s, "wait_s": ring.wait_s, "wall_s": wall,
            "busy_share": clock.compute_s / wall if wall else 0.0, "peak_rss_mb": peak_rss_mb(),
            "cpu_s": cpu_seconds(),
            "rss_mb": rss_mb(),
            "messages_sent": ring.transport.stats.sent if ring.transport else 0,
            "messages_received": ring.transport.stats.received if ring.transport else 0}
