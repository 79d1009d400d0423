"""Strict sync as an all-reduce: every rank runs the model, partial sums are exchanged.

In HALO sync rank 0 must decide alone which partials a layer uses, so the others send theirs to
it and it sends the next input back: two messages and rank 0's bookkeeping per round. Strict sync
uses every partial, so it can be the blocking all-reduce that other systems run: every rank adds
the same partials, so every rank holds the same residual stream and goes on with the next
sub-layer itself. A round costs one all-reduce instead of two messages plus rank 0's turn-around.
The all-reduce is MPI_Iallreduce, waited for by the transport's spin-then-nap policy; when ranks
share cores (the policy naps at once), or under emulated loss (which holds framed messages back),
it is framed messages from every contributing rank to every other, added in rank order.

Rank 0 still drives: it announces each step's token ids (STEP); every worker then embeds them
(rows read from its store), runs the same layers and sends its logits slice to rank 0, which
samples. Used for `--sync strict` with a float32 wire and no `--sparsity` (both need rank 0's
per-token decisions); otherwise strict runs through the coordinator like HALO.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import HaloError
from ..net.framing import Kind, Message, json_payload
from ..net.transport import Transport
from .attention import HeldAttention
from .placement import Placement


class Exchange:
    """The all-reduce of one rank: sends its partial to all, adds everyone's in rank order.

    Messages that arrive before they are needed (a faster rank's next layer, a worker's logits
    while rank 0 is still in the last layer) wait in `early`, keyed by (kind, step, layer, source).
    """

    def __init__(self, transport: Transport, attention: Placement, mlp: Placement, collective: bool = True):
        self.t = transport
        # collective: the transport's all-reduce. A collective advances only while every rank is
        # inside MPI: fine when each rank spins on its own core, slow when ranks share cores and
        # nap between tests (-n 4 on 2 cores: 829 ms/token against 104 framed). So framed
        # messages to every peer when the wait policy naps at once, and under emulated loss.
        self.collective = collective and transport.loss is None and transport.wait.spin_s > 0
        self.step = 0
        self.early: dict[tuple[int, int, int, int], np.ndarray] = {}
        self.others: list[Message] = []    # control messages met while waiting (STEP, STOP, DONE)
        # contributors per layer: the ranks holding attention groups, MLP groups of it
        self.attn_from = [[r for r in range(len(p)) if len(p[r])] for p in attention]
        self.mlp_from = [[r for r in range(len(p)) if len(p[r])] for p in mlp]
        self.wait_s = 0.0

    def allreduce(self, kind: Kind, layer: int, own: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The sum over the contributing ranks of their partials (T, dim), in rank order."""
        if self.collective:      # the transport's own all-reduce (MPI_Iallreduce): every rank joins
            x = own.numpy() if own is not None else np.zeros(tuple(like.shape), np.float32)
            t0 = time.perf_counter()
            out = self.t.allreduce(x)
            self.wait_s += time.perf_counter() - t0
            return torch.from_numpy(out)
        contributors = (self.attn_from if kind == Kind.ATTN_PARTIAL else self.mlp_from)[layer]
        me = self.t.rank
        if own is not None:
            payload = own.numpy()
            for r in range(self.t.size):
                if r != me:
                    self.t.send(r, kind, self.step, layer, payload, exact=True)
        parts = self.collect(kind, layer, [r for r in contributors if r != me])
        if own is not None:
            parts[me] = payload
        if not parts:
            return torch.zeros_like(like)
        order = sorted(parts)
        out = parts[order[0]].copy()                         # (T, dim), summed in rank order
        for r in order[1:]:
            out += parts[r]
        return torch.from_numpy(out)

    def collect(self, kind: Kind, layer: int, sources: list[int]) -> dict[int, np.ndarray]:
        """The messages of `kind` for (this step, layer) from `sources`, however long they take."""
        keys = {r: (int(kind), self.step, layer, r) for r in sources}
        t0 = time.perf_counter()
        while any(k not in self.early for k in keys.values()):
            self.sort(self.t.poll(1.0))
        self.wait_s += time.perf_counter() - t0
        return {r: self.early.pop(k) for r, k in keys.items()}

    def sort(self, messages: list[Message]):
        """Partials and logits into `early` by (kind, step, layer, source); the rest into `others`."""
        for m in messages:
            if m.kind in (Kind.PARTIAL, Kind.ATTN_PARTIAL, Kind.LOGITS):
                self.early[(int(m.kind), m.step, m.layer, m.source)] = m.payload
            else:
                self.others.append(m)


class ExchangeAttention:
    """A block's attention on any rank: its own groups' partial, all-reduced."""
    n_kv = 0        # the caches live with the groups (`HeldAttention`)
    nbytes = 0      # counted where they are held

    def __init__(self, exchange: Exchange, held: HeldAttention, layer: int, clock):
        self.exchange, self.held, self.layer, self.clock = exchange, held, layer, clock

    def __call__(self, x, k_cache, v_cache, pos: int, cos, sin) -> torch.Tensor:
        with self.clock:
            own = self.held.step(self.layer, x, pos) if self.layer in self.held.layers else None
        return self.exchange.allreduce(Kind.ATTN_PARTIAL, self.layer, own, x)


class ExchangeMLP:
    """A block's MLP on any rank: its own neuron groups' partial, all-reduced."""
    nbytes = 0

    def __init__(self, exchange: Exchange, mlps: dict, layer: int, clock):
        self.exchange, self.mlps, self.layer, self.clock = exchange, mlps, layer, clock

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlps.get(self.layer)
        with self.clock:
            own = mlp(x) if mlp is not None else None
        return self.exchange.allreduce(Kind.PARTIAL, self.layer, own, x)


class ComputeClock:
    """`with clock:` adds the block's seconds to `seconds`; with speed < 1 it first stretches the
    block to emulate a slower device (as the star's Worker does), sleeping (1/speed - 1) x its time."""

    def __init__(self, speed: float = 1.0):
        self.seconds, self.speed = 0.0, speed

    def __enter__(self):
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.speed < 1.0:
            time.sleep((time.perf_counter() - self._t0) * (1.0 / self.speed - 1.0))
        self.seconds += time.perf_counter() - self._t0


class Follower:
    """A worker of the all-reduce: runs every step rank 0 announces, sends rank 0 its logits slice.

    model: the Transformer with ExchangeAttention/ExchangeMLP parts, the embedding read from the
    store and this rank's vocabulary slice as its output (None: no slice here); held, mlps: the
    groups it holds (for the statistics).
    """

    def __init__(self, transport: Transport, exchange: Exchange, model, held: HeldAttention, mlps: dict,
                 clock: ComputeClock, loading=None):
        self.t, self.exchange, self.model, self.clock = transport, exchange, model, clock
        self.held, self.mlps = held, mlps
        self.loading = loading                 # BudgetedWeights under --mem-budget, else None
        self.cache = model.new_cache(model.args.max_seq_len)     # empty: the caches are in `held`
        self.steps = 0

    def next_message(self) -> Message:
        while not self.exchange.others:
            self.exchange.sort(self.t.poll(1.0))
        return self.exchange.others.pop(0)

    def run(self) -> dict:
        while True:
            m = self.next_message()
            if m.kind == Kind.STOP:
                return self.finish()
            if m.kind != Kind.STEP:
                raise HaloError(f"rank {self.t.rank} got an unexpected {m.kind.name} from rank {m.source}")
            self.run_step(m)

    @torch.inference_mode()
    def run_step(self, m: Message):
        """STEP: token ids (T,) int32 at position `pos`; `layer` 1 = logits of the last token only."""
        self.exchange.step = m.step
        tokens = torch.from_numpy(m.payload.reshape(-1).astype(np.int64))
        self.cache.pos = m.pos
        h = self.model.layers(self.model.embed(tokens), self.cache)
        if self.model.output is not None:
            with self.clock:
                logits = self.model.head(h[-1:] if m.layer == 1 else h)       # (1 or T, slice)
            self.t.send(0, Kind.LOGITS, m.step, self.model.args.n_layers, logits.numpy(), exact=True)
        self.steps += 1

    def finish(self) -> dict:
        s, head, mlps = self.t.stats, self.model.output, [m for m in self.mlps.values() if m is not None]
        # the model's own bytes are its head slice and norms
        weights = self.held.nbytes + sum(m.nbytes for m in mlps) + self.model.weight_bytes()
        if self.loading is not None:
            self.loading.close()
            weights += self.loading.buffer_bytes
        stats = {"rank": self.t.rank, "computed": self.steps, "skipped": 0, "appended_only": 0, "plans": 0,
                 "compute_s": self.clock.seconds, "wait_s": self.exchange.wait_s,
                 "sent": s.sent, "held_by_loss": s.held, "held_seconds": s.held_seconds,
                 "groups": int(sum(len(m.ids) for m in mlps)),
                 "attention_groups": int(sum(len(h.attention.ids) for h in self.held.layers.values())),
                 "head_rows": 0 if head is None else head.stop - head.start, "weight_bytes": weights,
                 **({"loading": self.loading.stats()} if self.loading is not None else {})}
        self.t.pump(flush=True)
        self.t.send(0, Kind.DONE, 0, 0, json_payload(stats))
        self.t.pump(flush=True)
        return stats
