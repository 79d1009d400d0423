"""A worker rank of tensor mode: partial sums for its attention groups, MLP groups and head slice.

Messages from rank 0 are served in order. Every attention input appends its K/V (the cache never
has holes), but only the newest piece of work in a batch is computed and answered: rank 0 sends a
layer's input only after closing the previous one, so older inputs belong to closed steps (MLP
groups and the head are stateless), and computing them would only make a late worker lag for
good. A re-plan (PLAN) moves groups here, read from this rank's store; attention groups move with
their K/V caches (CACHE), relayed by rank 0.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import HaloError
from ..model.groups import GroupMLP
from ..net.framing import Kind, Message, json_payload
from ..net.transport import Transport
from ..stats import RssTrace
from .attention import HeldAttention, join_cache, send_cache
from .coordinator import LoadGroups

WORK = (Kind.INPUT, Kind.ATTN_INPUT, Kind.HEAD_INPUT)
REPLY = {Kind.INPUT: Kind.PARTIAL, Kind.ATTN_INPUT: Kind.ATTN_PARTIAL, Kind.HEAD_INPUT: Kind.LOGITS}


class Worker:
    """Serves rank 0's inputs for the groups it holds (module docstring).

    held: its attention groups with their caches; head: its vocabulary slice (or None) and
    load_head(start, stop) to read another; load_groups lets a re-plan move MLP groups here;
    speed < 1 stretches every compute to emulate a slower device; sparse: MLP inputs carry a
    mask row.
    """

    def __init__(self, transport: Transport, mlps: dict[int, GroupMLP], load_groups: LoadGroups | None = None,
                 speed: float = 1.0, sparse: bool = False, held: HeldAttention | None = None,
                 head=None, load_head=None, loading=None):
        self.t, self.mlps, self.load_groups = transport, mlps, load_groups
        self.loading = loading                 # BudgetedWeights under --mem-budget, else None
        self.held, self.head, self.load_head = held, head, load_head
        self.speed, self.sparse = speed, sparse
        self.version = 0
        self.computed = self.skipped = self.appended_only = self.plans = 0
        self.compute_s = 0.0
        self.importing: dict[int, dict] = {}   # layer -> {"ids", "pos", "chunks": {head: {p: kv}}}
        self.rss = RssTrace(every=500)         # resident MB every 500 inputs

    def run(self) -> dict:
        stash: list[Message] = []   # messages held back until their PLAN or their groups' caches arrive
        retry = False
        while True:
            batch = stash + ([] if retry else self.t.poll(1.0))
            stash, before = [], (self.version, len(self.importing))
            work = [i for i, m in enumerate(batch) if m.kind in WORK]
            for i, m in enumerate(batch):
                if m.kind == Kind.STOP:
                    return self.finish(skipped=sum(1 for w in batch[i:] if w.kind in WORK))
                if m.kind == Kind.PLAN:
                    self.apply_plan(m)
                elif m.kind == Kind.CACHE:
                    self.take_cache(m)
                elif m.plan > self.version or (m.kind == Kind.ATTN_INPUT and m.layer in self.importing):
                    stash.append(m)
                else:
                    self.serve(m, newest=i == work[-1])
            # what was held back is looked at again at once if what it waited for came meanwhile
            retry = bool(stash) and (self.version, len(self.importing)) != before

    def serve(self, m: Message, newest: bool):
        self.rss.tick()
        answer = newest and m.plan == self.version   # else: a closed step, or an old plan
        if m.kind == Kind.ATTN_INPUT:
            self.timed(m, lambda m, x: self.held.step(m.layer, x, m.pos, reply=answer))
            self.appended_only += not answer
        elif answer:
            self.timed(m, self.mlp if m.kind == Kind.INPUT else self.logits)
        else:
            self.skipped += 1

    def timed(self, m: Message, compute):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = compute(m, torch.from_numpy(m.payload))
        spent = time.perf_counter() - t0
        if self.speed < 1.0:      # emulate a slower device: stretch this compute
            time.sleep(spent * (1.0 / self.speed - 1.0))
        self.compute_s += time.perf_counter() - t0
        if out is not None:
            self.computed += 1
            self.t.send(0, REPLY[m.kind], m.step, m.layer, out.numpy(), plan=self.version,
                        exact=m.kind == Kind.HEAD_INPUT)

    def mlp(self, m: Message, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlps.get(m.layer)
        if mlp is None:
            raise HaloError(f"rank {self.t.rank} holds no MLP groups of layer {m.layer}")
        if self.sparse:
            return mlp.subset(x[:-1], x[-1, :len(mlp.ids)].numpy() > 0.5)
        return mlp(x)

    def logits(self, m: Message, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise HaloError(f"rank {self.t.rank} holds no slice of the output head")
        return self.head(x)

    # -- re-plans
    def apply_plan(self, m: Message):
        if self.load_groups is None:
            raise HaloError(f"rank {self.t.rank} got a re-plan but cannot load groups")
        plan = m.json()
        for layer, ids in enumerate(plan["mlp"]):
            ids = np.asarray(ids, dtype=np.int64)
            current = self.mlps.get(layer)
            if current is None or not np.array_equal(current.ids, ids):
                self.mlps[layer] = self.load_groups(layer, ids) if len(ids) else None
        if plan["vocab"] is not None and self.load_head is not None:
            start, stop = plan["vocab"]
            if self.head is None or (self.head.start, self.head.stop) != (start, stop):
                self.head = self.load_head(start, stop) if stop > start else None
        if plan["attention"] is not None:
            self.move_attention(plan["attention"], plan["pos"], m.step, m.plan)
        self.version = m.plan
        self.plans += 1

    def move_attention(self, attention: list, pos: int, step: int, version: int):
        """Send the caches of the groups leaving (to rank 0, which relays them), and wait for those
        of the groups arriving before serving their layer."""
        for layer, ids in enumerate(attention):
            ids, held = set(ids), set(self.held.heads(layer).tolist())
            for head in sorted(held - ids):
                send_cache(self.t, 0, step, layer, head, self.held.export(layer, head), pos, plan=version)
            if ids - held and pos:
                self.importing[layer] = {"ids": sorted(ids), "pos": pos, "new": ids - held,
                                         "chunks": {h: {} for h in ids - held}}
            elif ids != held:
                self.held.regroup(layer, np.array(sorted(ids), dtype=np.int64))

    def take_cache(self, m: Message):
        job = self.importing.get(m.layer)
        if job is None or m.seq not in job["chunks"]:
            raise HaloError(f"rank {self.t.rank} got the cache of head {m.seq} of layer {m.layer} unasked")
        job["chunks"][m.seq][m.pos] = m.payload
        if all(sum(len(c) for c in ch.values()) == 2 * job["pos"] for ch in job["chunks"].values()):
            caches = {h: join_cache(ch, job["pos"]) for h, ch in job["chunks"].items()}
            self.held.regroup(m.layer, np.array(job["ids"], dtype=np.int64), caches)
            del self.importing[m.layer]

    # -- the end
    def finish(self, skipped: int) -> dict:
        self.skipped += skipped
        if self.loading is not None:
            self.loading.close()
        stats = self.stats()
        # partials still held by emulated loss go out now, so that DONE is the last
        # message rank 0 receives from us (MPI keeps the order of one sender's messages)
        self.t.pump(flush=True)
        self.t.send(0, Kind.DONE, 0, 0, json_payload(stats))
        self.t.pump(flush=True)
        return stats

    @property
    def weight_bytes(self) -> int:
        n = sum(m.nbytes for m in self.mlps.values() if m is not None)
        n += self.held.nbytes if self.held is not None else 0
        n += self.loading.buffer_bytes if self.loading is not None else 0
        return n + (self.head.nbytes if self.head is not None else 0)

    def stats(self) -> dict:
        s = self.t.stats
        held = [m for m in self.mlps.values() if m is not None]
        attention = self.held.layers.values() if self.held is not None else []
        return {"rank": self.t.rank, "computed": self.computed, "skipped": self.skipped,
                "appended_only": self.appended_only,
                "plans": self.plans, "compute_s": self.compute_s, "wait_s": s.wait_seconds,
                "sent": s.sent, "held_by_loss": s.held, "held_seconds": s.held_seconds,
                "groups": int(sum(len(m.ids) for m in held)),
                "attention_groups": int(sum(len(h.attention.ids) for h in attention)),
                "head_rows": 0 if self.head is None else self.head.stop - self.head.start,
                "weight_bytes": self.weight_bytes, "rss_mb_trace": self.rss.samples,
                **({"loading": self.loading.stats()} if self.loading is not None else {})}
