"""The all-reduce among the stable members: every member adds the same partials.

Every stable rank (rank 0 among them) holds the residual stream and runs every layer; per
sub-layer each computes the partial of the groups it holds and the members sum them, so each goes
on with the same hidden state. A round costs one all-reduce (a message latency), not two
messages and rank 0's turn-around as the star did. Unstable ranks (satellites) are not members:
rank 0 gathers their MLP partials under deadlines and folds the ones in time into its own partial
before the all-reduce (tensor/satellites.py), so the members still add the same set.

How a round moves, by what the wire carries and how the ranks wait:
- a collective (`Transport.allreduce`, MPI_Iallreduce) for a float32 wire when every rank has a
  core of its own (its wait spins) and no loss is emulated;
- `Transport.allgather` of each member's partial encoded in the wire precision (float16,
  bfloat16, q8) otherwise under the same conditions;
- framed messages from every member to every other when ranks share cores (a collective advances
  only while every rank is inside MPI: -n 4 on 2 cores ran 829 ms/token against 104 framed) or
  under emulated loss (which holds framed messages back).
Each member sums the partials in rank order, its own one decoded from its wire form too, so the
sum is the same on every member whatever arrived first, whatever the wire precision.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..net.framing import Kind, Message
from ..net.links import LinkEstimate
from ..net.probe import LATE_S
from ..net.transport import Transport
from ..net.wire import decode_body, encode_body


class Exchange:
    """One member's all-reduce over the members (sorted ranks, this one among them).

    Messages that arrive before they are needed (a faster member's next layer, a member's logits
    while rank 0 is still in the last layer) wait in `early`, keyed by (kind, step, layer, source);
    control messages met while waiting go to `others`.
    """

    def __init__(self, transport: Transport, members: list[int], wire: str = "float32",
                 collective: bool = True):
        self.t, self.members, self.wire = transport, sorted(members), wire
        self.collective = (collective and len(self.members) > 1 and transport.loss is None
                           and transport.wait.spin_s > 0)
        self.step = 0
        self.early: dict[tuple[int, int, int, int], np.ndarray] = {}
        self.others: list[Message] = []
        self.computed: list[tuple[int, int, int]] = []   # members' (source, step, compute us): logits
        self.wait_s = 0.0
        self.rounds = 0
        # rank 0: each worker member's link, one outcome per decode round: its partial came
        # within LATE_S of rank 0's own being ready (planner.py demotes a member late too often)
        self.links: dict[int, LinkEstimate] | None = None
        self.measuring = False            # set by the lead: decode steps only
        self.clock = time.perf_counter

    def allreduce(self, kind: Kind, layer: int, own: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The members' partials (T, dim) summed in rank order; `own` None: this member has none."""
        x = own.numpy() if own is not None else np.zeros(tuple(like.shape), np.float32)
        if len(self.members) == 1:
            return own if own is not None else torch.zeros_like(like)
        t0 = time.perf_counter()
        if self.collective and self.wire == "float32":
            out = self.t.allreduce(x)
        elif self.collective:
            gathered = self.t.allgather(encode_body(x, self.wire))          # (members, bytes)
            out = self._sum([decode_body(b, self.wire, *x.shape) for b in gathered])
        else:
            out = self._framed(kind, layer, x)
        self.wait_s += time.perf_counter() - t0
        self.rounds += 1
        return torch.from_numpy(out)

    def _framed(self, kind: Kind, layer: int, x: np.ndarray) -> np.ndarray:
        me = self.t.rank
        for r in self.members:
            if r != me:
                self.t.send(r, kind, self.step, layer, x, wire=self.wire)
        parts = self.collect(kind, layer, [r for r in self.members if r != me])
        parts[me] = x if self.wire == "float32" else as_on_the_wire(x, self.wire)
        return self._sum([parts[r] for r in self.members])

    @staticmethod
    def _sum(parts: list[np.ndarray]) -> np.ndarray:
        out = parts[0].copy()                                # (T, dim), summed in rank order
        for p in parts[1:]:
            out += p
        return out

    def collect(self, kind: Kind, layer: int, sources: list[int]) -> dict[int, np.ndarray]:
        """The messages of `kind` for (this step, layer) from `sources`, however long they take
        (rank 0 in a decode step also times each member's: `judge`)."""
        keys = {r: (int(kind), self.step, layer, r) for r in sources}
        t0 = self.clock()
        if self.measuring and self.links is not None and kind != Kind.LOGITS:
            self.judge(self._timed(keys, t0))
        else:
            while any(k not in self.early for k in keys.values()):
                self.sort(self.t.poll(1.0))
        self.wait_s += self.clock() - t0
        return {r: self.early.pop(k) for r, k in keys.items()}

    def _timed(self, keys: dict[int, tuple], t0: float) -> dict[int, bool]:
        """Waits for every key; source -> whether it came within LATE_S of t0."""
        waiting, on_time = dict(keys), {}
        while waiting:
            if any(k not in self.early for k in waiting.values()):
                self.sort(self.t.poll(1.0))
            now = self.clock()
            for r, k in list(waiting.items()):
                if k in self.early:
                    del waiting[r]
                    on_time[r] = now - t0 <= LATE_S
        return on_time

    def judge(self, on_time: dict[int, bool]):
        """Rank 0: each member's round on time or late; not when every one of two or more was
        late (this rank was the one held up: descheduled on a busy machine)."""
        if len(on_time) > 1 and not any(on_time.values()):
            return
        for r, ok in on_time.items():
            if r in self.links:
                self.links[r].add_outcome(ok)

    def sort(self, messages: list[Message]):
        """Partials and logits into `early` by (kind, step, layer, source); the rest into `others`."""
        for m in messages:
            if m.kind in (Kind.PARTIAL, Kind.ATTN_PARTIAL, Kind.LOGITS) and m.source in self.members:
                self.early[(int(m.kind), m.step, m.layer, m.source)] = m.payload
                if m.kind == Kind.LOGITS:        # seq: the member's compute microseconds that step
                    self.computed.append((m.source, m.step, m.seq))
            else:
                m.arrived_at = self.clock()
                self.others.append(m)


def as_on_the_wire(x: np.ndarray, wire: str) -> np.ndarray:
    """x (T, dim) as the other ranks decode it."""
    return decode_body(encode_body(x, wire), wire, *x.shape)


class ComputeClock:
    """`with clock:` adds the block's seconds to `seconds`; with
    speed < 1, or from step `slow[1]` on under --slow, it first stretches the block to emulate a
    slower device, sleeping (stretch - 1) x its time. `step` is set by the rank's loop."""

    def __init__(self, speed: float = 1.0, slow: tuple[float, int] | None = None):
        self.seconds, self.speed, self.slow = 0.0, speed, slow
        self.step = 0

    def stretch(self) -> float:
        f = 1.0 / self.speed
        if self.slow is not None and self.step >= self.slow[1]:
            f *= self.slow[0]
        return f

    def __enter__(self):
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        f = self.stretch()
        if f > 1.0:
            time.sleep((time.perf_counter() - self._t0) * (f - 1.0))
        self.seconds += time.perf_counter() - self._t0
