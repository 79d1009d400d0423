"""Pipeline mode (MDI-LLM): contiguous blocks of layers on a ring of ranks, with recurrent
pipeline parallelism over several sequences.

    mpiexec -n 4 halo-mpi generate --parallel pipeline --prompt-file prompts.txt --num-sequences 8

Rank 0 holds the embedding, the first block of layers and the head; rank r > 0 holds the r-th
block (halo_mpi/split.py chooses the blocks). A sequence's hidden states go 0 -> 1 -> ... -> N-1
and back to 0: rank 0 embeds a token and runs its block, each next rank runs its own, the last
sends the final hidden state home, where rank 0 applies the head, samples the next token and
sends it round again. With S sequences in flight every rank works on a different one at once;
each rank keeps one KV cache per sequence and takes whichever message arrives next. A sequence
that ends (stop token or its token budget) leaves the ring; the others go on, and the next
waiting prompt takes its place.

Messages (comm.Kind), identified by sequence (`seq`, the prompt's index) and `step`:
    ACTIVATION  (T, dim) hidden states of tokens step .. step+T-1 of `seq`, entering the block
                that starts at `layer`; layer = n_layers: home to rank 0's head (T = 1);
                T = 0: the sequence has finished, free its KV caches
    STOP        rank 0 -> 1 -> ... -> N-1 along the ring, so it trails every activation on a link
    DONE        each rank -> rank 0: the rank's statistics (JSON), its last message
A prompt's prefill goes round once, in chunks of --prefill-chunk tokens; then one token per hop.
Every rank's receives are posted ahead (comm.MPITransport) and waiting sleeps between tests.

The model code knows nothing of this: a stage is `Transformer.from_store(store, layers=...)`.
"""
from __future__ import annotations

import resource
import statistics
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .comm import HEADER, Kind, LocalHub, Message, MPITransport, json_payload
from .config import ModelArgs
from .errors import HaloError
from .generate import GenerationResult, Sampler
from .model import KVCache, Transformer
from .split import Device, read_device_profile, split_layers, stage_costs

WAIT = 0.05             # longest single wait for a message before checking for cancellation, s
BARRIER_NAP = 1e-3      # sleep between tests of a gentle barrier, s
DONE_BYTES = 1 << 16    # room for a DONE message's JSON
NO_ROWS = np.zeros((0, 1), np.float32)


# ---------------------------------------------------------------------------------------------
# the plan: what every rank must know before the ring starts (built on rank 0, broadcast)

@dataclass
class Request:
    """One sequence to generate."""
    ids: list[int]          # prompt token ids
    max_new: int            # tokens to generate at most


@dataclass
class Options:
    in_flight: int = 0                  # S, sequences circulating at once; 0 = all of them
    temperature: float = 0.0            # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset = frozenset()   # a sampled stop id ends its sequence (and is not kept)
    prefill_chunk: int = 64             # prompt tokens per activation message
    dtype: str = "float32"
    keep_logits: bool = False           # keep every sequence's logits (tests)


@dataclass
class Plan:
    prompt_lens: list[int]      # per sequence
    max_lens: list[int]         # KV cache slots per sequence: prompt + max_new
    split: list[range]          # layers of each rank, contiguous, rank 0's first
    in_flight: int              # S
    chunk: int                  # prompt tokens per prefill message
    dim: int
    n_layers: int
    dtype: str

    @property
    def size(self) -> int:
        return len(self.split)

    @property
    def max_bytes(self) -> int:
        """Largest message: a prefill chunk (chunk, dim) float32, or a DONE."""
        return HEADER.itemsize + max(self.chunk * self.dim * 4, DONE_BYTES)


def make_plan(args: ModelArgs, requests: list[Request], size: int, options: Options,
              devices: list[Device] | None = None) -> Plan:
    if not requests:
        raise HaloError("pipeline mode needs at least one prompt")
    for i, r in enumerate(requests):
        if not r.ids or len(r.ids) + r.max_new > args.max_seq_len:
            raise HaloError(f"prompt {i} has {len(r.ids)} tokens and asks for {r.max_new} more; the "
                            f"model's context holds 1 to {args.max_seq_len} in all")
    in_flight = min(options.in_flight or len(requests), len(requests))
    max_lens = [len(r.ids) + r.max_new for r in requests]
    kv_tokens = sum(sorted(max_lens)[-in_flight:])     # the S longest sequences, all at once
    costs = stage_costs(args, options.dtype, kv_tokens) if devices else None
    return Plan(prompt_lens=[len(r.ids) for r in requests], max_lens=max_lens,
                split=split_layers(args.n_layers, size, devices, costs), in_flight=in_flight,
                chunk=options.prefill_chunk, dim=args.dim, n_layers=args.n_layers,
                dtype=options.dtype)


def load_stage_model(store, plan: Plan, rank: int) -> Transformer:
    """Only this rank's layers (plus the embedding and head on rank 0) are read from the store."""
    return Transformer.from_store(store, layers=plan.split[rank], embedding=rank == 0,
                                  head=rank == 0, dtype=plan.dtype)


# ---------------------------------------------------------------------------------------------
# one rank's stage: its block of layers and a KV cache per sequence

class Stage:
    def __init__(self, model: Transformer, rank: int, plan: Plan):
        self.model, self.rank, self.plan = model, rank, plan
        self.caches: dict[int, KVCache] = {}     # seq -> its cache for this rank's layers

    @torch.inference_mode()
    def run(self, seq: int, step: int, h: torch.Tensor) -> torch.Tensor:
        """This rank's block on tokens step .. step+T-1 of seq: (T, dim) -> (T, dim)."""
        cache = self.caches.get(seq)
        if cache is None and step == 0:
            cache = self.caches[seq] = self.model.new_cache(self.plan.max_lens[seq])
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

    def send(self, dest: int, kind: Kind, step: int, layer: int, payload: np.ndarray, seq: int = 0):
        if dest == self.rank:
            self._loopback.append(Message(dest, kind, step, layer, payload, time.perf_counter(), seq))
        else:
            self.transport.send(dest, kind, step, layer, payload, seq=seq)

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

    def pass_on(self, plan: Plan, seq: int, step: int, h: torch.Tensor):
        """A block's output (T, dim) goes to the next stage; from the last stage, only the newest
        token's state goes home, and only once the whole prompt is in (a next token is due)."""
        T = h.shape[0]
        if not self.is_last:
            self.send(self.next, Kind.ACTIVATION, step, plan.split[self.next].start, h.numpy(), seq)
        elif step + T >= plan.prompt_lens[seq]:
            self.send(0, Kind.ACTIVATION, step + T - 1, plan.n_layers, h[-1:].numpy(), seq)

    def release(self, plan: Plan, seq: int):
        """Tell the next stage that seq has finished (the last stage tells no one)."""
        if not self.is_last:
            self.send(self.next, Kind.ACTIVATION, 0, plan.split[self.next].start,
                      np.zeros((0, plan.dim), np.float32), seq)


# ---------------------------------------------------------------------------------------------
# rank 0: sequences enter, the head samples, sequences leave

@dataclass
class Sequence:
    index: int                   # the prompt's index
    ids: list[int]               # prompt ids
    max_new: int
    sampler: Sampler
    result: GenerationResult
    started_at: float
    token_times: list[float] = field(default_factory=list)   # perf_counter of each token
    logits: list[torch.Tensor] = field(default_factory=list)  # (vocab,) per sample, keep_logits

    @property
    def next_pos(self) -> int:
        """Position of the newest token, whose state comes home next."""
        return len(self.ids) + len(self.result.tokens) - 1


class Conductor:
    """Rank 0's duties besides its block: start sequences, sample from the head, retire them."""

    def __init__(self, ring: Ring, stage: Stage, clock: Clock, requests: list[Request],
                 options: Options, on_finish=None):
        self.ring, self.stage, self.clock, self.plan = ring, stage, clock, stage.plan
        self.requests, self.options, self.on_finish = requests, options, on_finish
        self.active: dict[int, Sequence] = {}
        self.done: dict[int, Sequence] = {}

    def start(self, index: int):
        """Prefill: the prompt goes round once, chunk by chunk, behind this rank's block."""
        o, req = self.options, self.requests[index]
        self.active[index] = Sequence(index, req.ids, req.max_new,
                                      Sampler(o.temperature, o.top_p, o.seed),
                                      GenerationResult(prompt_tokens=len(req.ids)), time.perf_counter())
        ids, model = torch.tensor(req.ids), self.stage.model
        for p in range(0, len(req.ids), self.plan.chunk):
            with self.clock.compute():
                h = self.stage.run(index, p, model.embed(ids[p:p + self.plan.chunk]))  # (T, dim)
            self.ring.pass_on(self.plan, index, p, h)

    def on_return(self, msg: Message):
        """The final hidden state of a sequence's newest token: sample, then send the next round."""
        seq = self.active.get(msg.seq)
        if msg.kind != Kind.ACTIVATION or seq is None or msg.step != seq.next_pos:
            raise RuntimeError(f"rank 0: unexpected {msg.kind.name} from rank {msg.source} for "
                               f"sequence {msg.seq}, step {msg.step}")
        with self.clock.compute(), torch.inference_mode():
            logits = self.stage.model.head(torch.from_numpy(msg.payload))[0]   # (1, dim) -> (vocab,)
            token = seq.sampler(logits)
        self._record(seq, logits)
        if seq.max_new == 0:
            return self.finish(seq, "max-new-tokens")
        if token in self.options.stop_ids:
            return self.finish(seq, "end-of-sequence token")
        seq.result.tokens.append(token)
        if len(seq.result.tokens) >= seq.max_new:
            return self.finish(seq, "max-new-tokens")
        with self.clock.compute():
            h = self.stage.run(seq.index, seq.next_pos, self.stage.model.embed(torch.tensor([token])))
        self.ring.pass_on(self.plan, seq.index, seq.next_pos, h)

    def _record(self, seq: Sequence, logits: torch.Tensor):
        now = time.perf_counter()
        if seq.token_times:
            seq.result.decode_s.append(now - seq.token_times[-1])
        else:
            seq.result.prefill_s = now - seq.started_at      # time to the first token
        seq.token_times.append(now)
        if self.options.keep_logits:
            seq.logits.append(logits.clone())

    def finish(self, seq: Sequence, reason: str):
        seq.result.stopped_by = reason
        self.stage.release(seq.index)
        self.ring.release(self.plan, seq.index)
        self.done[seq.index] = self.active.pop(seq.index)
        if self.on_finish:
            self.on_finish(seq)


def conduct(ring: Ring, stage: Stage, clock: Clock, requests: list[Request], options: Options,
            on_finish=None, cancelled=None) -> list[Sequence]:
    """Rank 0's loop: keep S sequences in flight until every prompt has finished."""
    c = Conductor(ring, stage, clock, requests, options, on_finish)
    waiting = deque(range(len(requests)))
    while waiting or c.active:
        timeout = WAIT
        if waiting and len(c.active) < stage.plan.in_flight:
            c.start(waiting.popleft())
            timeout = 0.0            # more to start: only take what has already arrived
        for msg in ring.poll(timeout):
            c.on_return(msg)
        check(cancelled)
    return [c.done[i] for i in range(len(requests))]


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
        h = stage.run(msg.seq, msg.step, torch.from_numpy(msg.payload))     # (T, dim)
    ring.pass_on(stage.plan, msg.seq, msg.step, h)


# ---------------------------------------------------------------------------------------------
# statistics

def peak_rss_mb() -> float:
    """Peak resident memory of this process, loading transients included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def rss_mb() -> float:
    """Resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20   # pages -> MiB
    except OSError:
        return 0.0


def held_parameters(model: Transformer) -> int:
    """Weights this rank holds: its blocks' matrices and norms, and the embedding/head if any."""
    def linear(lin):
        return 0 if lin is None else lin.in_features * lin.out_features
    n = sum(linear(b.attention.qkv) + linear(b.attention.o) + linear(b.feed_forward.gate_up)
            + linear(b.feed_forward.down) + b.attn_norm.numel() + b.ffn_norm.numel()
            for b in model.blocks.values())
    n += linear(model.output) + (0 if model.embedding is None else model.embedding.numel())
    return n + (0 if model.norm is None else model.norm.numel())


def rank_stats(ring: Ring, stage: Stage, clock: Clock) -> dict:
    wall, layers = clock.wall(), stage.plan.split[ring.rank]
    return {"rank": ring.rank, "layers": [layers.start, layers.stop], "n_layers": len(layers),
            "embedding_and_head": ring.rank == 0, "parameters": held_parameters(stage.model),
            "compute_s": clock.compute_s, "wait_s": ring.wait_s, "wall_s": wall,
            "busy_share": clock.compute_s / wall if wall else 0.0, "peak_rss_mb": peak_rss_mb(),
            "rss_mb": rss_mb(),
            "messages_sent": ring.transport.stats.sent if ring.transport else 0,
            "messages_received": ring.transport.stats.received if ring.transport else 0}


@dataclass
class PipelineRun:
    """What rank 0 knows at the end of a run."""
    plan: Plan
    sequences: list[Sequence]       # by prompt index
    ranks: list[dict]               # rank_stats of every rank
    wall_s: float                   # first prefill to last token
    pending_requests: int = 0       # over all ranks, after closing their transports

    def set_pending(self, per_rank: list[int]):
        for stats, n in zip(self.ranks, per_rank):
            stats["pending_requests_at_end"] = n
        self.pending_requests = sum(per_rank)

    @property
    def tokens(self) -> int:
        return sum(len(s.result.tokens) for s in self.sequences)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else float("nan")

    @property
    def ms_per_token_median(self) -> float:
        gaps = [d for s in self.sequences for d in s.result.decode_s]
        return 1e3 * statistics.median(gaps) if gaps else float("nan")

    def as_json(self) -> dict:
        def number(x):
            return None if x != x else x     # NaN is not JSON
        return {"mode": "pipeline", "world_size": self.plan.size, "num_sequences": self.plan.in_flight,
                "dtype": self.plan.dtype, "split": [[r.start, r.stop] for r in self.plan.split],
                "tokens": self.tokens, "wall_s": self.wall_s, "tokens_per_s": number(self.tokens_per_s),
                "ms_per_token_median": number(self.ms_per_token_median),
                "pending_requests_at_end": self.pending_requests,
                "sequences": [{"index": s.index, **s.result.as_dict(),
                               "ms_per_token_median": number(s.result.ms_per_token_median),
                               "tokens_per_s": number(s.result.tokens_per_s)} for s in self.sequences],
                "ranks": self.ranks}

    def summary_lines(self) -> list[str]:
        lines = [f"[{s.index}] prompt {s.result.prompt_tokens} tokens; generated {len(s.result.tokens)}, "
                 f"first after {s.result.prefill_s * 1e3:.0f} ms, {s.result.ms_per_token_median:.1f} "
                 f"ms/token (median); stopped by {s.result.stopped_by}" for s in self.sequences]
        lines.append(f"pipeline: {self.plan.size} ranks, {len(self.sequences)} sequences "
                     f"({self.plan.in_flight} in flight): {self.tokens} tokens in {self.wall_s:.2f} s, "
                     f"{self.tokens_per_s:.1f} tokens/s total, {self.ms_per_token_median:.1f} ms "
                     f"between a sequence's tokens (median)")
        for r in self.ranks:
            a, b = r["layers"]
            lines.append(f"rank {r['rank']}: layers {a}-{b - 1} ({b - a}){' + embedding, head' if r['embedding_and_head'] else ''}"
                         f", {r['parameters'] / 1e6:.1f} M parameters | busy {100 * r['busy_share']:.0f}% "
                         f"(compute {r['compute_s']:.2f} s, wait {r['wait_s']:.2f} s) | "
                         f"peak RSS {r['peak_rss_mb']:.0f} MB (now {r['rss_mb']:.0f} MB)")
        lines.append(f"requests pending at the end: {self.pending_requests}")
        return lines


# ---------------------------------------------------------------------------------------------
# one rank's run, the same under MPI and as a thread of the local twin

def run_rank(ring: Ring, stage: Stage, requests: list[Request] | None, options: Options,
             on_finish=None, cancelled=None) -> PipelineRun | None:
    """Roles are dispatched here: rank 0 conducts, the others serve. Rank 0 returns the run."""
    clock = Clock()
    if ring.rank != 0:
        serve(ring, stage, clock, cancelled)
        return None
    sequences = conduct(ring, stage, clock, requests, options, on_finish, cancelled)
    wall = clock.wall()
    others = stop_ring(ring, cancelled)
    return PipelineRun(stage.plan, sequences, [rank_stats(ring, stage, clock)] + others, wall)


# ---------------------------------------------------------------------------------------------
# under MPI

def ring_peers(rank: int, size: int) -> list[int]:
    """Whom a rank receives from: rank 0 from everyone (activations from the last, DONE from
    all); the others from their predecessor only."""
    return list(range(1, size)) if rank == 0 else [rank - 1]


def gentle_barrier(comm):
    """A barrier that sleeps while it waits: MPI's own spins a core, slowing ranks still loading."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(BARRIER_NAP)


def collectively(comm, fn):
    """fn() on every rank; a HaloError on any rank ends them all with one line (launch.collective).
    Ranks that finish early sleep in a barrier meanwhile, instead of spinning in the allgather."""
    from .launch import collective

    def then_meet():
        try:
            return fn()
        finally:
            gentle_barrier(comm)
    return collective(comm, then_meet)


def abort(comm, error: BaseException):
    """One line on stderr, then end every rank of the job within seconds."""
    rank = comm.Get_rank()
    if isinstance(error, KeyboardInterrupt):
        print(f"halo-mpi: interrupted on rank {rank}", file=sys.stderr, flush=True)
        code = 130
    else:
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" ({tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})" if tb else ""
        print(f"halo-mpi: error on rank {rank}: {type(error).__name__}: {error}{where}",
              file=sys.stderr, flush=True)
        code = HaloError.exit_code if isinstance(error, HaloError) else 1
    comm.Abort(code)


def run_pipeline(comm, weights: str, requests: list[Request] | None, options: Options,
                 devices: list[Device] | None = None, on_finish=None) -> PipelineRun | None:
    """Every rank calls this; requests and devices are read on rank 0 only. Returns the run on
    rank 0, None elsewhere. Each rank opens the store itself and reads only its own layers."""
    from .store import Store
    rank, size = comm.Get_rank(), comm.Get_size()

    def plan_on_rank0():
        with Store(weights) as store:
            return make_plan(store.args, requests, size, options, devices)

    plan = comm.bcast(collectively(comm, plan_on_rank0 if rank == 0 else lambda: None), root=0)

    def load():
        with Store(weights) as store:
            return load_stage_model(store, plan, rank)

    stage = Stage(collectively(comm, load), rank, plan)
    transport = MPITransport(comm, plan.max_bytes, peers=ring_peers(rank, size)) if size > 1 else None
    gentle_barrier(comm)                    # the clocks start together
    try:
        run = run_rank(Ring(transport, rank, size), stage, requests, options, on_finish)
        pending = transport.close() if transport else 0
    except BaseException as e:              # Ctrl-C or a failure: no rank may wait forever
        abort(comm, e)
    gentle_barrier(comm)
    pending = comm.gather(pending, root=0)
    if run is not None:
        run.set_pending(pending)
    return run


# ---------------------------------------------------------------------------------------------
# the single-process twin: ranks as threads over in-memory queues (tests)

def run_local(store, requests: list[Request], options: Options, size: int,
              devices: list[Device] | None = None, timeout: float = 600.0) -> PipelineRun:
    plan = make_plan(store.args, requests, size, options, devices)
    stages = [Stage(load_stage_model(store, plan, r), r, plan) for r in range(size)]
    hub, cancelled = LocalHub(size), threading.Event()
    results: list = [None] * size
    errors: list[BaseException] = []

    def rank_main(r: int):
        try:
            ring = Ring(hub.transports[r] if size > 1 else None, r, size)
            results[r] = run_rank(ring, stages[r], requests if r == 0 else None, options,
                                  cancelled=cancelled)
        except BaseException as e:          # noqa: B036 - handed to the caller below
            errors.append(e)
            cancelled.set()

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"rank-{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        cancelled.set()
        raise RuntimeError(f"the local pipeline did not finish within {timeout} s")
    real = [e for e in errors if not isinstance(e, Cancelled)]
    if errors:
        raise (real or errors)[0]
    run = results[0]
    run.set_pending([t.close() for t in hub.transports])
    return run


# ---------------------------------------------------------------------------------------------
# benchmark: halo-mpi bench --modes pipeline (under mpiexec), rows shaped like bench_single's

def bench_pipeline(comm, weights: str, dtypes: list[str], tokens: int, warmup: int,
                   in_flight: int = 0, log=print) -> list[dict] | None:
    """Decode speed with S sequences (default 2 per rank) of a 16-token prompt, no stop tokens:
    ms between a sequence's tokens after `warmup` of them, and total tokens/s while every
    sequence is past its warm-up. Every rank calls this; rank 0 returns the rows."""
    size, rows = comm.Get_size(), []
    S = in_flight or 2 * size
    requests = [Request([100 + 7 * i + j for j in range(16)], warmup + tokens) for i in range(S)]
    for dtype in dtypes:
        run = run_pipeline(comm, weights, requests if comm.Get_rank() == 0 else None,
                           Options(in_flight=S, dtype=dtype))
        if run is not None:
            rows.append(bench_row(run, tokens, warmup))
            log(format_bench_row(rows[-1]))
    return rows if comm.Get_rank() == 0 else None


def bench_row(run: PipelineRun, tokens: int, warmup: int) -> dict:
    gaps = sorted(d for s in run.sequences for d in s.result.decode_s[warmup:])
    start = max(s.token_times[warmup] for s in run.sequences)     # all sequences warm
    end = min(s.token_times[-1] for s in run.sequences)           # all sequences still running
    steady = sum(start < t <= end for s in run.sequences for t in s.token_times)
    return {"mode": "pipeline", "dtype": run.plan.dtype, "threads": torch.get_num_threads(),
            "tokens": tokens, "ranks": run.plan.size, "sequences": run.plan.in_flight,
            "ms_per_token_median": 1e3 * statistics.median(gaps),
            "ms_per_token_p95": 1e3 * gaps[int(0.95 * (len(gaps) - 1))],
            "tokens_per_s": steady / (end - start) if end > start else run.tokens_per_s,
            "rank_stats": run.ranks}


def format_bench_row(row: dict) -> str:
    from .bench import format_row
    busy = ", ".join(f"{100 * r['busy_share']:.0f}%" for r in row["rank_stats"])
    return (f"{format_row(row)} ({row['ranks']} ranks, {row['sequences']} sequences: ms/token is "
            f"per sequence, tokens/s in total; busy {busy})")


# ---------------------------------------------------------------------------------------------
# the command line: halo-mpi generate --parallel pipeline

def read_requests(a) -> tuple[list[str], list[Request], object]:
    """Rank 0's input: prompts, their token ids and budgets, the tokenizer."""
    from .cli import encode_prompt, read_prompts
    from .store import Store
    from .tokenizer import Tokenizer
    prompts = read_prompts(a)
    with Store(a.weights) as store:
        tok = Tokenizer.from_store(store)
        encoded = [encode_prompt(tok, p, a, store.args.max_seq_len) for p in prompts]
    if a.num_sequences and a.num_sequences > len(prompts):
        print(f"note: --num-sequences {a.num_sequences} capped to the {len(prompts)} prompts given",
              file=sys.stderr)
    return prompts, [Request(ids, max_new) for ids, max_new in encoded], tok


def sequence_printer(tok, prompts: list[str], a):
    """Each sequence's text on its own, labelled by its prompt's index, as soon as it finishes."""
    def print_sequence(seq: Sequence):
        prefix = "" if a.chat or a.quiet else prompts[seq.index]
        print(f"[{seq.index}] {prefix}{tok.decode(seq.result.tokens)}", flush=True)
    return print_sequence


def run_generate(a, comm=None):
    """`mpiexec -n N halo-mpi generate --parallel pipeline ...` on every rank."""
    from mpi4py import MPI

    from .cli import stop_ids, write_stats
    from .runtime import configure_threads
    comm = MPI.COMM_WORLD if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    configure_threads(a.threads)
    prompts, requests, tok = collectively(comm, (lambda: read_requests(a)) if rank == 0 else lambda: (None,) * 3)
    devices = collectively(comm, lambda: read_device_profile(getattr(a, "device_profile", None), size)
                           if rank == 0 else None)
    options = Options(in_flight=a.num_sequences or 0, temperature=a.temperature, top_p=a.top_p,
                      seed=a.seed, stop_ids=frozenset(stop_ids(tok, a)) if tok else frozenset(),
                      prefill_chunk=getattr(a, "prefill_chunk", 64), dtype=a.dtype)
    run = run_pipeline(comm, a.weights, requests, options, devices,
                       on_finish=sequence_printer(tok, prompts, a) if rank == 0 else None)
    if run is None:
        return
    print("\n".join(run.summary_lines()), file=sys.stderr)
    if a.stats_json:
        write_stats(a.stats_json, {**run.as_json(), "weights": a.weights})
