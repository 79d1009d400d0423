"""The end of a run on rank 0: STOP to every worker, their statistics collected, the ones that
did not answer named (tensor/run.py reports them and ends the job, never waits for them)."""
from __future__ import annotations

import time

import numpy as np

from ..errors import HaloError
from ..net.framing import Kind


def stop_workers(lead, timeout: float = 20.0) -> dict[int, dict]:
    """STOP every worker and collect its statistics; late partials are drained meanwhile. A
    worker that does not answer within `timeout` (frozen, gone) is listed in `silent`: the
    caller reports what it has and ends the job, never waits for it; a satellite still heard
    from (its DONE stuck behind retransmissions on a lossy link) in `unanswered`: reported,
    and the job ends as it should."""
    if lead.loading is not None:
        lead.loading.close()
    lead.t.pump(flush=True)   # held inputs go first: a worker must see them before its STOP
    # STOP carries the plan in force: a satellite not asked since the switch (a probe) reports it
    for r in range(1, lead.t.size):
        lead.t.send(r, Kind.STOP, lead.step + 1, -1, np.zeros((0, 1), np.float32),
                    plan=lead.planner.version)
    done: dict[int, dict] = {}
    end = time.perf_counter() + timeout
    pending = lead.inbox.take_others() + lead.inbox.control
    while True:
        for m in pending:
            if m.kind == Kind.DONE:
                done[m.source] = m.json()
                lead.t.finished.add(m.source)   # it may exit now: a send to it could block MPI
            elif m.kind in (Kind.PARTIAL, Kind.ATTN_PARTIAL, Kind.LOGITS):
                lead.satellites.late_discarded[m.source] += 1
            elif m.kind != Kind.READY:
                raise HaloError(f"rank 0 got an unexpected {m.kind.name} from rank {m.source}")
        silent = set(lead.t.silent())                                             # (unreachable:
        waiting = set(range(1, lead.t.size)) - set(done) - silent                 #  not waited for)
        if not waiting or time.perf_counter() > end:
            missing = set(range(1, lead.t.size)) - set(done)
            # a satellite still heard from is alive behind a late link: its figures are
            # missing, its results never were (HALO went on without its late partials)
            lead.unanswered = sorted(r for r in missing - silent if r not in lead.members)
            lead.silent = sorted(missing - set(lead.unanswered))
            return done
        pending = lead.t.poll(1.0)
