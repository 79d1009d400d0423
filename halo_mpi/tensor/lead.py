"""Rank 0 of a tensor-parallel run: a member that also leads.

    mpiexec -n 4 halo-mpi generate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05 \\
        --prompt "The capital of France is" --temperature 0

Per step rank 0 lets the planner switch plans (planner.py), announces the step's tokens to the
other members (STEP) and runs the model as they do (member.py). Per MLP layer it also predicts
which groups matter for this token, sends the layer's input to the satellites (the unstable
ranks) before computing its own partial, and folds theirs in under the deadlines
(satellites.py) before the members' all-reduce. After the last layer it gathers the members'
logits slices, once per token, and samples. With no unstable rank, HALO sync is exactly the
all-reduce (and the predictor is not even run): strict sync's speed.

The model itself does not know any of this: `MemberAttention`, `MemberMLP` and `GatheredHead`
replace its parts from outside.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.llama import KVCache
from ..net.framing import Kind, Message
from .member import Member
from .planner import Planner
from .policy import SyncPolicy
from .satellites import Satellites
from .slots import BATCH, DECODING, LAST_ONLY, REPLAY, pack_feeds
from .speeds import SpeedMeter


class LeadInbox:
    """Rank 0's messages sorted by who needs them: members' partials and logits to the exchange,
    satellites' partials to the deadline gather (what `poll` returns), READY and DONE kept in
    `control` for the planner and the end."""

    def __init__(self, lead: Lead):
        self.lead = lead
        self.control: list[Message] = []

    def poll(self, timeout: float) -> list[Message]:
        ex = self.lead.exchange
        ex.sort(self.lead.t.poll(timeout))
        return self.take_others()

    def take_others(self) -> list[Message]:
        """The messages the exchange set aside: satellites' replies out, control kept."""
        ex, replies = self.lead.exchange, []
        for m in ex.others:
            (replies if m.kind == Kind.PARTIAL else self.control).append(m)
        ex.others.clear()
        return replies


class Lead(Member):
    """Rank 0: a member (member.py) with the satellites, the planner and the step's announcement."""

    def __init__(self, member_parts: dict, policy: SyncPolicy, satellites: Satellites, planner: Planner,
                 halo_predictor: bool = False):
        super().__init__(**member_parts)
        self.policy = policy
        self.inbox = LeadInbox(self)
        self.satellites, self.planner = satellites, planner
        self.halo_predictor = halo_predictor     # per-token importance for the satellites' deadlines
        self.step = 0
        self.model_bytes = 0                     # the model's own weights here (norms)
        self.silent: list[int] = []              # workers that did not answer STOP
        self.unanswered: list[int] = []          # satellites heard from whose DONE did not come in time
        self.speeds: SpeedMeter | None = None    # the ranks' measured speeds, when re-planning (assembly)
        self._computed = 0.0                     # rank 0's compute seconds when the step began
        self.history: dict[int, list[int]] = {}  # slot -> its sequence's token ids so far, by position
        self.chunk = 64                          # tokens per replayed step (--prefill-chunk: assembly)
        self.replay_due = False                  # members changed: recompute the K/V caches
        self.replays: list[tuple[int, int]] = []  # (step, positions) of each replay

    @property
    def members(self) -> list[int]:
        """The stable members, rank 0 among them (the exchange's: the ranks it all-reduces over)."""
        return self.exchange.members

    @property
    def vocab(self) -> list[tuple[int, int]]:
        """rank -> [start, stop) of the head under the plan in force (a speed re-plan moves them)."""
        return self.planner.head.vocab

    @property
    def head_slice(self):
        return self.planner.head.own

    @property
    def links(self) -> dict:
        return self.satellites.links

    @property
    def records(self):
        return self.satellites.records

    # -- steps
    def begin_step(self, tokens: torch.Tensor, pos: int, decoding: bool, last_only: bool, slot: int = 0):
        """Plans, then STEP to every other member: one sequence's tokens (T,) from position pos
        (its attention caches: slot's), flags, plan."""
        version = self._begin([(slot, pos)], decoding)
        self.sequences.slots = [slot]
        self.history[slot].extend(tokens.tolist())
        flags = (LAST_ONLY if last_only else 0) | (DECODING if decoding else 0)
        ids = tokens.numpy().astype(np.int32).reshape(-1, 1)                      # (T, 1)
        self._announce(ids, pos, flags, version, slot)

    def begin_batch(self, feeds: list[tuple[int, int, list[int]]], decoding: bool):
        """The same for a batched step: feeds are (slot, position, new token ids) per sequence."""
        version = self._begin([(slot, pos) for slot, pos, _ in feeds], decoding)
        self.sequences.slots = [slot for slot, _, _ in feeds]
        for slot, _, ids in feeds:
            self.history[slot].extend(ids)
        self._announce(pack_feeds(feeds), 0, BATCH | (DECODING if decoding else 0), version)

    def _begin(self, starts: list[tuple[int, int]], decoding: bool) -> int:
        """A step's start: the plan it runs under (its version); (slot, position) of each sequence
        in it. A plan that changed the members first replays the sequences so far (`replay`)."""
        self._next_step(decoding)
        self.rss.tick()
        self.satellites.discard_late(self.inbox.poll(0.0))      # replies of closed steps
        control, self.inbox.control = self.inbox.control, []
        version = self.planner.begin_step(self.step, decoding, self.links, control)
        for slot, pos in starts:
            del self.history.setdefault(slot, [])[pos:]
        if self.replay_due:
            self.replay(version)
            self._next_step(decoding)
        return version

    def forget(self, slot: int):
        """Slot's sequence is over: nothing of it to replay."""
        self.history.pop(slot, None)

    def _next_step(self, decoding: bool):
        self.step += 1
        self.decoding = self.exchange.measuring = decoding
        self.clock.step, self._computed = self.step, self.clock.seconds
        self.satellites.begin_step(self.step, decoding)
        self.exchange.step = self.step

    def _announce(self, ids: np.ndarray, pos: int, flags: int, version: int, slot: int = 0):
        for r in self.members:
            if r != 0:
                self.t.send(r, Kind.STEP, self.step, flags, ids, plan=version, pos=pos, seq=slot)

    def change_members(self, members: list[int], attention):
        """At the switch to a plan that demoted a member or promoted a satellite (planner.py):
        the members hold the attention groups of `attention` ([layer][rank] -> KV heads), each
        cache empty until the replay refills it."""
        for r in set(self.members) - set(members):
            self.satellites.add(r)
            self.t.fatal.discard(r)          # its silence no longer ends the run
        for r in set(members) - set(self.members):
            self.satellites.remove(r)
            self.t.fatal.add(r)              # it holds attention groups and head rows now
        self.exchange.members, self.exchange.collective = sorted(members), False   # (the collective's
        self.attention_groups.reassign({l: p[0] for l, p in enumerate(attention)})  #  group had it)
        self.replay_due = True

    @torch.inference_mode()
    def replay(self, version: int):
        """Every running sequence's positions so far again, in steps of `chunk` tokens, under the
        plan just switched to, without the head: every member refills its attention groups' K/V
        caches (those it just gained have none) the way a prompt's prefill fills them; the
        satellites' MLP groups computed by rank 0, as in any prefill."""
        self.replay_due = False
        positions = 0
        for slot, history in sorted(self.history.items()):
            ids = torch.tensor(history, dtype=torch.long)
            cache = self.model.new_cache(max(len(ids), 1))  # positions only: the K/V live with the groups
            self.sequences.slots = [slot]
            for start in range(0, len(ids), self.chunk):
                self._next_step(False)                      # each chunk a step of its own
                chunk = ids[start:start + self.chunk]
                self._announce(chunk.numpy().astype(np.int32).reshape(-1, 1), start, REPLAY, version, slot)
                cache.pos = start
                self.model.layers(self.model.embed(chunk), cache)
            positions += len(ids)
        self.replays.append((self.step, positions))

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's MLP round: satellites' inputs out, own partial, theirs folded in, all-reduce."""
        sats = self.satellites
        placed = self.planner.placement[layer]
        peers = sats.to_ask(layer, placed, None, self.planner.probes) if sats.ranks else []
        imp = self.group_importance(layer, x, bool(peers))
        keep = self.keep(layer, x, imp) if self.sparse_step else None
        if keep is not None:
            self.records[-1].skipped_share += float(imp[~keep].sum()) / len(self.planner.placement)
            peers = sats.to_ask(layer, placed, keep, self.planner.probes)
        if peers:
            sats.send(layer, x, peers, placed, keep, self.planner.version)
        with self.clock:
            own = self.groups.partial(layer, x, keep)
        if sats.ranks:
            probes = self.planner.probes
            members_share = float(sum(imp[placed[r]].sum() for r in self.members + sorted(probes)))
            folded = sats.fold(layer, x, peers, placed, imp, keep, members_share, self.planner.version,
                               probes)
            if folded is not None:
                own = folded if own is None else own + folded
        return self.exchange.allreduce(Kind.PARTIAL, layer, own, x)

    def group_importance(self, layer: int, x: torch.Tensor, asked: bool) -> np.ndarray:
        """(G,) shares of this layer's importance for the current token(s): the predictor's in
        decode steps where satellites are asked (HALO) or groups are skipped (--sparsity), else
        calibration's (strict sync drops nothing: no per-token prediction needed)."""
        if (asked and self.decoding and self.halo_predictor) or self.sparse_step:
            return self.importance(layer, x)
        return self.static_importance[layer]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (T, vocab): every member's vocabulary slice, gathered strictly."""
        holders = [r for r in self.members if r != 0 and self.vocab[r][1] > self.vocab[r][0]]
        parts = {}
        if self.head_slice is not None:
            with self.clock:
                parts[0] = self.head_slice(x)
        got = self.exchange.collect(Kind.LOGITS, len(self.planner.placement), holders)
        parts.update((r, torch.from_numpy(p)) for r, p in got.items())
        self.measure()
        return torch.cat([parts[r] for r in sorted(parts, key=lambda r: self.vocab[r][0])], dim=-1)

    def measure(self):
        """A decode step's compute times (rank 0's own, the members' with their logits) into the
        speed meter."""
        members, self.exchange.computed = self.exchange.computed, []
        if self.speeds is None or not self.decoding:
            return
        self.speeds.add(0, self.clock.seconds - self._computed)
        for r, step, us in members:
            if step == self.step:
                self.speeds.add(r, us / 1e6)

    # -- the end
    @property
    def weight_bytes(self) -> int:
        """Rank 0's resident weights: its MLP groups, copies of satellites', attention, head slice."""
        n = self.groups.nbytes + self.satellites.nbytes + self.attention_groups.nbytes
        n += self.loading.buffer_bytes if self.loading is not None else 0
        return n + (self.head_slice.nbytes if self.head_slice is not None else 0)


class GatheredHead:
    """Stands in for the output head on rank 0: (T, dim) -> (T, vocab) from every member's slice."""
    nbytes = 0          # rank 0's slice is counted in Lead.weight_bytes

    def __init__(self, lead: Lead):
        self.lead = lead

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.lead.head(x)


class TensorParallelSession:
    """The generate() session of rank 0: the model with its distributed parts, one sequence."""

    def __init__(self, model, lead: Lead, max_len: int, prefill_chunk: int):
        self.model, self.lead, self.chunk = model, lead, prefill_chunk
        self.cache = model.new_cache(max_len)

    def prefill(self, ids: list[int]) -> torch.Tensor:
        for start in range(0, len(ids), self.chunk):
            logits = self.step(torch.tensor(ids[start:start + self.chunk]), decoding=False)
        return logits[0]

    def decode(self, token: int) -> torch.Tensor:
        return self.step(torch.tensor([token]), decoding=True)[0]

    def step(self, tokens: torch.Tensor, decoding: bool, last_only: bool = True) -> torch.Tensor:
        """Logits of tokens (T,) appended to the sequence: (1, vocab), or (T, vocab)."""
        self.lead.begin_step(tokens, self.cache.pos, decoding, last_only)
        return self.model(tokens, self.cache, last_only=last_only)

    def close(self):
        """(The groups' K/V caches are reused by the next sequence, from position 0.)"""
        self.lead.forget(0)


@dataclass
class Slot:
    """A sequence of a TensorBatch: its slot (whose caches its attention groups use, on every
    member) and the model's cache of it (positions only)."""
    slot: int
    cache: KVCache


class TensorBatch:
    """Rank 0's model as a batch of sequences (model/batch.py's BatchModel): a step announces
    every sequence's tokens in one STEP, and every round of it carries all their rows. A step is
    a decode step when each sequence feeds one token; one that carries a prompt's chunk is a
    prefill step (HALO: rank 0 computes the satellites' groups, as in any prefill). Every member
    packs its float32 weights at the first step that carries two sequences or more."""

    def __init__(self, model, lead: Lead, max_batch: int):
        self.model, self.lead = model, lead
        self.free = list(range(max_batch))      # slots not in use

    def open(self, max_len: int) -> Slot:
        return Slot(self.free.pop(0), self.model.new_cache(max_len))

    def step(self, feeds: list[tuple[Slot, list[int]]]) -> torch.Tensor:
        decoding = all(len(ids) == 1 for _, ids in feeds)
        if len(feeds) > 1:                      # (a run of one sequence never pays the memory)
            self.lead.pack_for_batches()
        self.lead.begin_batch([(s.slot, s.cache.pos, list(ids)) for s, ids in feeds], decoding)
        return self.model.step([(s.cache, ids) for s, ids in feeds])          # (B, vocab)

    def close(self, state: Slot):
        self.lead.forget(state.slot)
        self.free.append(state.slot)
        self.free.sort()
