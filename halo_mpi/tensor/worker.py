"""A worker rank of tensor mode: partial MLP sums for its neuron groups, as inputs arrive.

It skips inputs of steps that are already closed (MLP groups are stateless), so a worker whose
inputs were delayed catches up instead of lagging forever; a re-plan (PLAN) moves groups here,
read from this rank's store.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import HaloError
from ..model.groups import GroupMLP
from ..net.framing import Kind, Message, json_payload
from ..net.transport import Transport
from .coordinator import LoadGroups


class Worker:
    """Computes partial MLP sums for its groups; skips inputs of steps already closed.

    load_groups lets a re-plan move groups here (read from this rank's store); speed < 1
    stretches every compute to emulate a slower device; sparse: inputs carry a mask row.
    """

    def __init__(self, transport: Transport, mlps: dict[int, GroupMLP], load_groups: LoadGroups | None = None,
                 speed: float = 1.0, sparse: bool = False):
        self.t, self.mlps, self.load_groups = transport, mlps, load_groups
        self.speed, self.sparse = speed, sparse
        self.version = 0
        self.computed = self.skipped = self.plans = 0
        self.compute_s = 0.0

    def run(self) -> dict:
        waiting: Message | None = None     # an input made for a plan that has not arrived yet
        while True:
            inputs = [waiting] if waiting else []
            waiting = None
            for m in self.t.poll(1.0):
                if m.kind == Kind.STOP:
                    return self.finish(skipped=len(inputs))
                if m.kind == Kind.PLAN:
                    self.apply_plan(m)
                elif m.kind == Kind.INPUT:
                    inputs.append(m)
            if not inputs:
                continue
            # rank 0 sends a layer's input only after closing the previous one: older inputs
            # in this batch belong to closed steps, and computing them would only make us lag
            self.skipped += len(inputs) - 1
            latest = inputs[-1]
            if latest.plan > self.version:   # its PLAN is still on the way (held by loss): wait
                waiting = latest
            elif latest.plan < self.version:  # made for an old plan: rank 0 will not use it
                self.skipped += 1
            else:
                self.compute(latest)

    def apply_plan(self, m: Message):
        if self.load_groups is None:
            raise HaloError(f"rank {self.t.rank} got a re-plan but cannot load groups")
        for layer, row in enumerate(m.payload):               # (L, width), -1 = no group
            ids = row[row >= 0].astype(np.int64)
            current = self.mlps.get(layer)
            if current is None or not np.array_equal(current.ids, ids):
                self.mlps[layer] = self.load_groups(layer, ids) if len(ids) else None
        self.version = m.plan
        self.plans += 1

    def compute(self, m: Message):
        t0 = time.perf_counter()
        mlp = self.mlps.get(m.layer)
        if mlp is None:
            raise HaloError(f"rank {self.t.rank} holds no MLP groups of layer {m.layer}")
        with torch.inference_mode():
            if self.sparse:
                x, keep = torch.from_numpy(m.payload[:-1]), m.payload[-1, :len(mlp.ids)] > 0.5
                partial = mlp.subset(x, keep).numpy()             # (T, dim)
            else:
                partial = mlp(torch.from_numpy(m.payload)).numpy()
        spent = time.perf_counter() - t0
        if self.speed < 1.0:      # emulate a slower device: stretch this compute
            time.sleep(spent * (1.0 / self.speed - 1.0))
        self.compute_s += time.perf_counter() - t0
        self.computed += 1
        self.t.send(0, Kind.PARTIAL, m.step, m.layer, partial, plan=self.version)

    def finish(self, skipped: int) -> dict:
        self.skipped += skipped
        stats = self.stats()
        # partials still held by emulated loss go out now, so that DONE is the last
        # message rank 0 receives from us (MPI keeps the order of one sender's messages)
        self.t.pump(flush=True)
        self.t.send(0, Kind.DONE, 0, 0, json_payload(stats))
        self.t.pump(flush=True)
        return stats

    def stats(self) -> dict:
        s = self.t.stats
        held = [m for m in self.mlps.values() if m is not None]
        return {"rank": self.t.rank, "computed": self.computed, "skipped": self.skipped,
                "plans": self.plans, "compute_s": self.compute_s, "wait_s": s.wait_seconds,
                "sent": s.sent, "held_by_loss": s.held, "held_seconds": s.held_seconds,
                "groups": int(sum(len(m.ids) for m in held)),
                "weights_mb": sum(m.nbytes for m in held) / 1e6}
