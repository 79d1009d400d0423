"""A stable member of a tensor-parallel run: it holds the residual stream and runs every layer.

Every member (rank 0 among them, tensor/lead.py) holds a share of each layer's attention groups
(KV heads with their K/V caches), of its MLP neuron groups, and a vocabulary slice of the head.
Per sub-layer it computes the partial of what it holds and the members all-reduce them
(tensor/exchange.py), so each goes on with the same hidden state. Rank 0 announces each step
(STEP: the token ids, their position, the plan); a worker member then embeds the tokens (rows
read from its store), runs the layers and sends rank 0 its logits slice.

The model does not know: `MemberAttention` and `MemberMLP` stand in for a block's attention and
MLP, from outside (gpt-fast style). With --sparsity every member skips the same groups: each runs
the predictor on the same input.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import HaloError
from ..model.linear import pack_linears
from ..model.llama import Ragged
from ..net.framing import Kind, Message, json_payload
from ..net.transport import Transport
from ..stats import RssTrace
from .attention import HeldAttention
from .exchange import ComputeClock, Exchange
from .held import HeldGroups, StepPace, loading_stats
from .satellite import Satellite, hand_over
from .slots import DECODING, REPLAY, Sequences


class Member:
    """One member's parts (module docstring); `run` is a worker member's loop."""

    def __init__(self, transport: Transport, exchange: Exchange, attention: HeldAttention, groups: HeldGroups,
                 clock: ComputeClock, importance: np.ndarray, sparsity: float = 0.0, predictor=None,
                 loading=None):
        self.t, self.exchange, self.attention_groups, self.groups = transport, exchange, attention, groups
        self.clock, self.sparsity, self.predictor = clock, sparsity, predictor
        self.static_importance = importance    # (n_layers, G) calibration shares
        self.loading = loading                 # BudgetedWeights under --mem-budget, else None
        self.decoding = False
        self.model = None                      # set by the assembly (it builds the model around us)
        self.steps = self.plans = 0
        self.rss = RssTrace(every=50)          # resident MB every 50 steps
        self.pace = StepPace()                 # how long steps take: a re-plan's reading per step
        self.load_head = None                  # (start, stop) -> a VocabSlice (set by the assembly)
        self.head_wanted: tuple | None = None  # a pending plan's head rows, and the slice once read
        self.head_read = None
        self.roles_wanted: tuple | None = None  # a pending plan's (members, my KV heads per layer)
        self.notes: dict = {}                   # more statistics (a promoted satellite's)
        self.make_member = None                 # a demoted member's way back (assemble.joining_member)
        self.packed_bytes = 0                   # float32 weights reordered for batched steps
        self.packed = False                     # (once, at the first batched step)
        self.sequences = Sequences(self)        # the step's sequences: slots, positions

    # -- a block's parts
    def attend(self, layer: int, x: torch.Tensor, pos: int) -> torch.Tensor:
        with self.clock:
            own = (self.attention_groups.step(layer, x, pos, slot=self.sequences.slots[0])
                   if layer in self.attention_groups.layers else None)
        return self.exchange.allreduce(Kind.ATTN_PARTIAL, layer, own, x)

    def attend_batch(self, layer: int, x: torch.Tensor, batch: Ragged) -> torch.Tensor:
        """A batched step's attention round: x (N, dim) holds the rows of the step's sequences."""
        with self.clock:
            own = (self.attention_groups.ragged(layer, x, batch, self.sequences.slots)
                   if layer in self.attention_groups.layers else None)
        return self.exchange.allreduce(Kind.ATTN_PARTIAL, layer, own, x)

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        keep = self.keep(layer, x, self.importance(layer, x)) if self.sparse_step else None
        with self.clock:
            own = self.groups.partial(layer, x, keep)
        return self.exchange.allreduce(Kind.PARTIAL, layer, own, x)

    @property
    def sparse_step(self) -> bool:
        return self.sparsity > 0 and self.decoding

    def importance(self, layer: int, x: torch.Tensor) -> np.ndarray:
        """(G,) shares of the layer's importance for x: the predictor's, or calibration's."""
        if self.predictor is None:
            return self.static_importance[layer]
        g = self.predictor(layer, x).sum(0).numpy()         # (G,) predicted contribution norms
        return g / g.sum()

    def keep(self, layer: int, x: torch.Tensor, imp: np.ndarray) -> np.ndarray:
        """(G,) False for the predicted least important --sparsity share of the layer's groups."""
        keep = np.ones(len(imp), bool)
        keep[np.argsort(-imp)[max(1, round((1 - self.sparsity) * len(imp))):]] = False
        return keep

    # -- a worker member's loop
    def run(self, first: list[Message] | None = None) -> dict:
        """Serve rank 0's steps until STOP; `first`: messages already taken (a promoted
        satellite's)."""
        self.exchange.sort(first or [])
        while True:
            m = self.next_message()
            if m.kind in (Kind.INPUT, Kind.STOP) and self.leaving:
                return self.become_satellite(m)
            if m.kind == Kind.STOP:
                return self.finish()
            if m.kind == Kind.PLAN:
                plan = m.json()
                self.groups.prepare(m.plan, {l: ids for l, ids in enumerate(plan["mlp"])})
                self.head_wanted, self.head_read = (tuple(plan["vocab"]) if "vocab" in plan else None), None
                self.roles_wanted = (plan["members"], plan["attention"]) if "members" in plan else None
                self.read_budget = float("inf") if plan.get("urgent") else self.pace.read_budget()
            elif m.kind == Kind.STEP:
                self.run_step(m)
            elif m.kind in (Kind.PARTIAL, Kind.ATTN_PARTIAL, Kind.LOGITS, Kind.INPUT):
                continue               # a former member's round, or an input from before it joined
            else:
                raise HaloError(f"rank {self.t.rank} got an unexpected {m.kind.name} from rank {m.source}")

    @property
    def leaving(self) -> bool:
        """Demoted by the plan being read (planner.py): a satellite from rank 0's next input."""
        return self.roles_wanted is not None and self.t.rank not in self.roles_wanted[0]

    def next_message(self) -> Message:
        while not self.exchange.others:
            self.exchange.sort(self.t.poll(1.0))
        return self.exchange.others.pop(0)

    @torch.inference_mode()
    def run_step(self, m: Message):
        """STEP under plan `plan`, flags in `layer`: one sequence's token ids (T,) int32 at
        position `pos` (slot `seq`), or several sequences' (BATCH: pack_feeds)."""
        self.pace.tick()
        self.read_plan(m.plan)
        self.rss.tick()
        self.exchange.step, self.decoding = m.step, bool(m.layer & DECODING)
        self.clock.step, computed = m.step, self.clock.seconds
        h, rows = self.sequences.layers(m)
        if self.model.output is not None and not m.layer & REPLAY:
            with self.clock:
                logits = self.model.head(h[rows])                   # (rows, slice)
            # seq: this step's compute microseconds, from which rank 0 learns this rank's speed
            us = min(int(1e6 * (self.clock.seconds - computed)), 2**31 - 1)
            self.t.send(0, Kind.LOGITS, m.step, self.model.args.n_layers, logits.numpy(), exact=True, seq=us)
        self.steps += 1

    def pack_for_batches(self):
        """At the first step of two sequences or more: float32 weights also kept in oneDNN's
        layout (see model/linear.py: several rows at about one row's cost; their memory twice).
        Weights read later (a re-plan's groups) and a memory budget's streamed ones are not."""
        if self.packed or self.loading is not None:
            return
        self.packed = True
        head = self.head_slice if self.t.rank == 0 else self.model.output
        self.packed_bytes = pack_linears(
            [lin for held in self.attention_groups.layers.values() for lin in held.attention.linears()]
            + [lin for mlp in self.groups.mlps.values() if mlp is not None for lin in mlp.linears()]
            + ([head.linear] if head is not None else []))

    def read_plan(self, version: int):
        """Between steps: read a pending plan's groups (READY once resident), and switch to it
        at the step rank 0 runs under it."""
        pending = self.groups.pending
        if pending is None:
            return
        if version >= pending.version:
            self.groups.advance(float("inf"))
            if not self.groups.switch(version):
                raise HaloError(f"rank {self.t.rank}: step under plan {version} before its groups")
            if self.head_wanted is not None:
                self.model.output = self.read_head()
            if self.roles_wanted is not None:           # a member left: replayed from position 0
                members, heads = self.roles_wanted
                self.exchange.members, self.exchange.collective = sorted(members), False
                self.attention_groups.reassign(dict(enumerate(heads)))
            self.head_wanted = self.head_read = self.roles_wanted = None
            self.plans += 1
        elif not pending.done and self.groups.advance(self.read_budget):
            self.read_head()
            self.t.send(0, Kind.READY, 0, 0, json_payload({}), plan=pending.version)

    def read_head(self):
        """The pending plan's head rows (read at once, after its groups), or the slice held."""
        if self.head_wanted is None:
            return self.model.output
        if self.head_read is None:
            head = self.model.output
            start, stop = self.head_wanted
            same = head is not None and (head.start, head.stop) == (start, stop)
            self.head_read = head if same else self.load_head(start, stop)
        return self.head_read

    def become_satellite(self, first: Message) -> dict:
        """Demoted (planner.py): from rank 0's first input on, serve MLP partials as a satellite
        does, with the groups of the plan being read; its statistics are the satellite's."""
        satellite = Satellite(self.t, self.groups, self.clock, sparse=self.sparsity > 0, loading=self.loading)
        hand_over(self, satellite, {"demoted": True, "member_steps": self.steps})
        return satellite.run(first=[first])

    def finish(self) -> dict:
        if self.loading is not None:
            self.loading.close()
        stats = self.stats()
        self.t.send_done(stats)
        return stats

    @property
    def weight_bytes(self) -> int:
        n = self.attention_groups.nbytes + self.groups.nbytes + self.model.weight_bytes()
        return n + (self.loading.buffer_bytes if self.loading is not None else 0)

    def stats(self) -> dict:
        s, head = self.t.stats, self.model.output
        return {"rank": self.t.rank, "role": "member", "computed": self.steps, "skipped": 0,
                "plans": self.plans,
                "compute_s": self.clock.seconds, "wait_s": self.exchange.wait_s,
                "rounds": self.exchange.rounds, "sent": s.sent, "held_by_loss": s.held,
                "held_seconds": s.held_seconds, "groups": self.groups.count,
                "attention_groups": self.attention_groups.count,
                "head_rows": 0 if head is None else head.stop - head.start, "weight_bytes": self.weight_bytes,
                "rss_mb_trace": self.rss.samples, "packed_bytes": self.packed_bytes,
                **loading_stats(self.loading, self.groups), **self.notes}


class MemberAttention:
    """Stands in for a block's attention: its held groups' partial, all-reduced. The K/V caches
    live with the groups (`HeldAttention`), so the model's own cache for it is empty."""
    n_kv = 0
    nbytes = 0           # counted where they are held

    def __init__(self, member: Member, layer: int):
        self.member, self.layer = member, layer

    def __call__(self, x, k_cache, v_cache, pos: int, cos, sin) -> torch.Tensor:
        return self.member.attend(self.layer, x, pos)

    def ragged(self, x: torch.Tensor, batch: Ragged, layer: int) -> torch.Tensor:
        return self.member.attend_batch(self.layer, x, batch)


class MemberMLP:
    """Stands in for a block's MLP: (T, dim) -> (T, dim) summed over every rank's groups."""
    nbytes = 0

    def __init__(self, member: Member, layer: int):
        self.member, self.layer = member, layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.member.mlp(self.layer, x)

