"""Tensor-parallel HALO mode: rank 0 coordinates, every rank computes MLP neuron groups.

    mpiexec -n 4 halo-mpi generate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05 \\
        --prompt "The capital of France is" --temperature 0

Rank 0 holds the embedding, norms, attention, residual stream, head and sampling, plus its own
share of every layer's MLP groups. Per layer it sends the normalized hidden state to the workers
holding groups of that layer, computes its own partial, and gathers theirs: all of them (strict
sync), or the critical ones plus whatever else arrives before each link's deadline (HALO sync).
A missing partial counts as zero; a late one is discarded when it arrives. The model itself does
not know any of this: `DistributedMLP` replaces each block's MLP from outside.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from .comm import Kind, LinkEstimate, Message, Transport, json_payload
from .errors import HaloError
from .groups import GroupMLP
from .placement import Placement


# ---------------------------------------------------------------------------------------------
# sync policy

@dataclass
class SyncPolicy:
    mode: str = "halo"                 # strict | halo
    critical_share: float = 0.5        # halo: wait until this share of importance has arrived
    unstable: frozenset = frozenset()  # ranks whose partials may be dropped
    deadline_factor: float = 1.5
    deadline_margin: float = 0.002     # seconds
    initial_deadline: float = 0.100    # seconds, before a link has samples

    def critical(self, own_share: float, shares: dict[int, float]) -> set[int]:
        """Peers to wait for without deadline: all (strict); stable ones, then unstable ones by
        importance until the critical share is covered (halo)."""
        if self.mode == "strict":
            return set(shares)
        chosen = {r for r in shares if r not in self.unstable}
        covered = own_share + sum(shares[r] for r in chosen)
        for r in sorted(set(shares) - chosen, key=lambda r: -shares[r]):
            if covered >= self.critical_share - 1e-9:
                break
            chosen.add(r)
            covered += shares[r]
        return chosen


@dataclass
class StepRecord:
    step: int
    decoding: bool
    dropped_share: float = 0.0                             # mean over layers of dropped importance
    dropped_ranks: Counter = field(default_factory=Counter)  # rank -> layers dropped


# ---------------------------------------------------------------------------------------------
# rank 0

class Coordinator:
    def __init__(self, transport: Transport, placement: Placement, importance: np.ndarray,
                 policy: SyncPolicy):
        self.t, self.placement, self.importance, self.policy = transport, placement, importance, policy
        self.n_layers = len(placement)
        self.peers_of = [[r for r in range(1, len(p)) if len(p[r])] for p in placement]
        self.shares = [{r: float(importance[l, placement[l][r]].sum()) for r in range(len(placement[l]))}
                       for l in range(self.n_layers)]
        self.links = {r: LinkEstimate(factor=policy.deadline_factor, margin=policy.deadline_margin,
                                      initial=policy.initial_deadline) for r in range(1, transport.size)}
        self.step, self.decoding = 0, False
        self.records: list[StepRecord] = []
        self.sent_at = 0.0                                   # when the current layer's inputs went out
        self.late_discarded = Counter()                      # rank -> stale partials thrown away
        self.used = Counter()                                # rank -> partials added in
        self.compute_s = 0.0
        self.gather_wait_s = 0.0

    # -- steps
    def begin_step(self, decoding: bool):
        self.step += 1
        self.decoding = decoding
        self.records.append(StepRecord(self.step, decoding))

    # -- one layer
    def mlp(self, layer: int, x: torch.Tensor, own: GroupMLP | None) -> torch.Tensor:
        peers = self.peers_of[layer]
        payload = x.numpy()                                   # (T, dim)
        for r in peers:
            self.t.send(r, Kind.INPUT, self.step, layer, payload)
        sent_at = self.sent_at = time.perf_counter()
        out = own(x) if own is not None else torch.zeros_like(x)
        self.compute_s += time.perf_counter() - sent_at
        for r, part in sorted(self.gather(layer, peers, sent_at).items()):
            out += torch.from_numpy(part)
        return out

    def gather(self, layer: int, peers: list[int], sent_at: float) -> dict[int, np.ndarray]:
        t0 = time.perf_counter()
        shares = {r: self.shares[layer][r] for r in peers}
        waiting = set(peers) if not self.decoding else self.policy.critical(self.shares[layer][0], shares)
        deadline = {r: sent_at + self.links[r].deadline() for r in peers}
        got: dict[int, np.ndarray] = {}
        while len(got) < len(peers):
            missing = [r for r in peers if r not in got]
            now = time.perf_counter()
            if any(r in waiting for r in missing):
                timeout = 1.0                                  # poll returns at the first arrival
            else:
                last = max(deadline[r] for r in missing)
                if now >= last:
                    break
                timeout = last - now
            for m in self.t.poll(timeout):
                self.receive(m, layer, got)
        self.account(layer, [r for r in peers if r not in got], shares)
        self.gather_wait_s += time.perf_counter() - t0
        return got

    def receive(self, m: Message, layer: int, got: dict):
        if m.kind != Kind.PARTIAL:
            raise HaloError(f"rank 0 got an unexpected {m.kind.name} message from rank {m.source}")
        if (m.step, m.layer) == (self.step, layer):
            got[m.source] = m.payload
            self.used[m.source] += 1
            if self.decoding:      # on-time round trips of decode steps feed the link estimate
                self.links[m.source].add_latency(time.perf_counter() - self.sent_at)
        else:                                                 # a closed step or layer: never mixed in
            self.late_discarded[m.source] += 1

    def account(self, layer: int, dropped: list[int], shares: dict[int, float]):
        rec = self.records[-1]
        for r in shares:
            self.links[r].add_outcome(r not in dropped)
        for r in dropped:
            rec.dropped_ranks[r] += 1
            rec.dropped_share += shares[r] / self.n_layers

    # -- the end
    def finish(self, timeout: float = 60.0) -> dict[int, dict]:
        """STOP every worker and collect its statistics; late partials are drained meanwhile."""
        self.t.pump(flush=True)   # held inputs go first: a worker must see them before its STOP
        for r in range(1, self.t.size):
            self.t.send(r, Kind.STOP, self.step + 1, -1, np.zeros((0, 1), np.float32))
        done: dict[int, dict] = {}
        end = time.perf_counter() + timeout
        while len(done) < self.t.size - 1:
            if time.perf_counter() > end:
                raise HaloError(f"workers {sorted(set(range(1, self.t.size)) - set(done))} did not "
                                f"finish within {timeout:.0f} s")
            for m in self.t.poll(1.0):
                if m.kind == Kind.DONE:
                    done[m.source] = m.json()
                else:
                    self.late_discarded[m.source] += 1
        return done


class DistributedMLP:
    """Stands in for a block's MLP on rank 0: (T, dim) -> (T, dim) summed over all ranks' groups."""

    def __init__(self, coordinator: Coordinator, layer: int, own: GroupMLP | None):
        self.coordinator, self.layer, self.own = coordinator, layer, own

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.coordinator.mlp(self.layer, x, self.own)


class TensorParallelSession:
    """The generate() session of rank 0: the model with DistributedMLPs, one KV cache."""

    def __init__(self, model, coordinator: Coordinator, max_len: int, prefill_chunk: int):
        self.model, self.coordinator, self.chunk = model, coordinator, prefill_chunk
        self.cache = model.new_cache(max_len)

    def prefill(self, ids: list[int]) -> torch.Tensor:
        for start in range(0, len(ids), self.chunk):
            self.coordinator.begin_step(decoding=False)
            logits = self.model(torch.tensor(ids[start:start + self.chunk]), self.cache, last_only=True)
        return logits[0]

    def decode(self, token: int) -> torch.Tensor:
        self.coordinator.begin_step(decoding=True)
        return self.model(torch.tensor([token]), self.cache, last_only=True)[0]


# ---------------------------------------------------------------------------------------------
# ranks 1..N-1

class Worker:
    """Computes partial MLP sums for its groups; skips inputs of steps already closed."""

    def __init__(self, transport: Transport, mlps: dict[int, GroupMLP], speed: float = 1.0):
        self.t, self.mlps, self.speed = transport, mlps, speed
        self.computed = self.skipped = 0
        self.compute_s = 0.0

    def run(self) -> dict:
        while True:
            msgs = self.t.poll(1.0)
            if any(m.kind == Kind.STOP for m in msgs):
                self.skipped += sum(m.kind == Kind.INPUT for m in msgs)
                stats = self.stats()
                # partials still held by emulated loss go out now, so that DONE is the last
                # message rank 0 receives from us (MPI keeps the order of one sender's messages)
                self.t.pump(flush=True)
                self.t.send(0, Kind.DONE, 0, 0, json_payload(stats))
                self.t.pump(flush=True)
                return stats
            inputs = [m for m in msgs if m.kind == Kind.INPUT]
            if not inputs:
                continue
            # rank 0 sends a layer's input only after closing the previous one: older inputs
            # in this batch belong to closed steps, and computing them would only make us lag
            self.skipped += len(inputs) - 1
            self.compute(inputs[-1])

    def compute(self, m: Message):
        t0 = time.perf_counter()
        mlp = self.mlps.get(m.layer)
        if mlp is None:
            raise HaloError(f"rank {self.t.rank} holds no MLP groups of layer {m.layer}")
        with torch.inference_mode():
            partial = mlp(torch.from_numpy(m.payload)).numpy()   # (T, dim)
        spent = time.perf_counter() - t0
        if self.speed < 1.0:      # emulate a slower device: stretch this compute
            time.sleep(spent * (1.0 / self.speed - 1.0))
        self.compute_s += time.perf_counter() - t0
        self.computed += 1
        self.t.send(0, Kind.PARTIAL, m.step, m.layer, partial)

    def stats(self) -> dict:
        s = self.t.stats
        return {"rank": self.t.rank, "computed": self.computed, "skipped": self.skipped,
                "compute_s": self.compute_s, "wait_s": s.wait_seconds, "sent": s.sent,
                "held_by_loss": s.held, "held_seconds": s.held_seconds,
                "groups": int(sum(len(m.ids) for m in self.mlps.values())),
                "weights_mb": sum(m.nbytes for m in self.mlps.values()) / 1e6}
