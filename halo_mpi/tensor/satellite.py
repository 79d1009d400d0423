"""An unstable rank (a satellite): partial sums of the MLP groups it holds, for rank 0.

It holds no attention and no head: those are never dropped, so they stay on the stable members.
Rank 0 sends it a layer's normalized input (INPUT) and waits for its partial only until a
deadline (tensor/satellites.py). Inputs are served in order, but only the newest in a batch is
computed and answered: rank 0 sends a layer's input only after closing the previous one, so older
inputs belong to closed steps, and computing them would only make a late satellite lag for good.
A re-plan (PLAN) moves groups here: they are read while it idles between inputs (held.py); READY
tells rank 0 they are resident, and the first input of the new plan switches to them.
"""
from __future__ import annotations

import torch

from ..errors import HaloError
from ..net.framing import Kind, Message, json_payload
from ..net.transport import Transport
from ..stats import RssTrace
from .exchange import ComputeClock
from .held import HeldGroups, loading_stats

IDLE_READ_S = 0.005     # reading a pending plan's groups, per idle poll
MEMBER_TRAFFIC = (Kind.STEP, Kind.ATTN_PARTIAL, Kind.PARTIAL, Kind.LOGITS)   # what a member gets


class Satellite:
    """Serves rank 0's MLP inputs (module docstring). speed < 1 stretches every compute to emulate
    a slower device; sparse: inputs carry a last row flagging the groups to compute."""

    def __init__(self, transport: Transport, held: HeldGroups, clock: ComputeClock | None = None,
                 sparse: bool = False, loading=None):
        self.t, self.held, self.sparse = transport, held, sparse
        self.clock = clock or ComputeClock()   # its speed (and --slow) stretch every compute
        self.loading = loading                 # BudgetedWeights under --mem-budget, else None
        self.computed = self.skipped = self.plans = 0
        self.rss = RssTrace(every=50)          # resident MB every 50 of rank 0's steps
        self.notes: dict = {}                  # more statistics (a demoted member's)
        self.make_member = None                # (members, heads, vocab, groups, clock) -> Member
        self.joining: tuple | None = None      # a plan that promotes it: (members, heads, vocab)

    def run(self, first: list[Message] | None = None) -> dict:
        """Serve until STOP; `first`: messages already taken (a demoted member's)."""
        stash: list[Message] = list(first or [])   # inputs of a plan whose groups are still being read
        while True:
            reading = self.held.pending is not None and not self.held.pending.done
            got = self.t.poll(0.0 if reading else 1.0)
            if not got and reading:
                self._read_pending()
            batch, stash = stash + got, []
            if not batch:
                continue
            work = [i for i, m in enumerate(batch) if m.kind == Kind.INPUT]
            for i, m in enumerate(batch):
                if self.joining is not None and m.kind in MEMBER_TRAFFIC:   # promoted: switched
                    return self.become_member(batch[i:])
                if m.kind == Kind.STOP:
                    if m.plan > self.held.version:      # switched to while not asked (a probe)
                        self.held.switch(m.plan)
                    return self.finish(skipped=len(stash) + sum(1 for w in batch[i:] if w.kind == Kind.INPUT))
                if m.kind == Kind.PLAN:
                    plan = m.json()
                    self.held.prepare(m.plan, {l: ids for l, ids in enumerate(plan["mlp"])})
                    if self.t.rank in plan.get("members", ()):
                        self.joining = (plan["members"], plan["attention"], tuple(plan["vocab"]))
                elif m.kind != Kind.INPUT:
                    raise HaloError(f"rank {self.t.rank} got an unexpected {m.kind.name} from "
                                    f"rank {m.source}")
                elif m.plan > self.held.version and not self.held.switch(m.plan):
                    stash.append(m)      # (rank 0 switches only after READY: not seen so far)
                else:
                    self.serve(m, newest=i == work[-1])

    def become_member(self, messages: list[Message]) -> dict:
        """Promoted (planner.py): from the members' first step under the new plan on (a replay
        from position 0, which fills the attention groups it now holds) it runs as a member."""
        if self.make_member is None:
            raise HaloError(f"rank {self.t.rank} was made a member, but cannot become one here")
        members, heads, vocab = self.joining
        member = self.make_member(members, heads, vocab, self.held, self.clock)
        hand_over(self, member, {"promoted": True, "satellite_computed": self.computed})
        return member.run(first=messages)

    def _read_pending(self):
        if self.held.advance(IDLE_READ_S):
            self.t.send(0, Kind.READY, 0, 0, json_payload({}), plan=self.held.pending.version)
            self.plans += 1

    def serve(self, m: Message, newest: bool):
        self.rss.at(m.step)     # by rank 0's steps: a probe is asked now and then
        if not newest or m.plan != self.held.version:     # a closed step, or an old plan
            self.skipped += 1
            return
        x = torch.from_numpy(m.payload)
        self.clock.step = m.step
        with torch.inference_mode(), self.clock:
            if self.sparse:
                out = self.held.partial(m.layer, x[:-1], x[-1].numpy() > 0.5)
            else:
                out = self.held.partial(m.layer, x)
        if out is None:
            out = torch.zeros(x.shape[0] - self.sparse, x.shape[1])
        self.computed += 1
        self.t.send(0, Kind.PARTIAL, m.step, m.layer, out.numpy(), plan=self.held.version)

    def finish(self, skipped: int) -> dict:
        self.skipped += skipped
        if self.loading is not None:
            self.loading.close()
        stats = self.stats()
        self.t.send_done(stats)
        return stats

    def stats(self) -> dict:
        s = self.t.stats
        weights = self.held.nbytes + (self.loading.buffer_bytes if self.loading is not None else 0)
        return {"rank": self.t.rank, "role": "satellite", "computed": self.computed, "skipped": self.skipped,
                "plans": self.plans, "compute_s": self.clock.seconds, "wait_s": s.wait_seconds,
                "sent": s.sent, "held_by_loss": s.held, "held_seconds": s.held_seconds,
                "groups": self.held.count, "attention_groups": 0, "head_rows": 0, "weight_bytes": weights,
                "rss_mb_trace": self.rss.samples,
                **loading_stats(self.loading, self.held), **self.notes}


def hand_over(old, new, notes: dict):
    """What goes with a rank from one role to the next (a Member and a Satellite, either way):
    the plans it read, its memory trace (one over its roles), its way back to membership, and
    `notes` on the change for its statistics."""
    new.plans, new.rss, new.notes = old.plans, old.rss, notes
    new.make_member = old.make_member
