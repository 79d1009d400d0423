"""The single-process twin of a tensor-parallel run: ranks as threads over in-memory queues.

    cluster = LocalCluster(store, make_plan(store, 3, options))
    logits = cluster.session(max_len).prefill(ids)
    worker_stats = cluster.stop()

Rank 0 runs in the calling thread, every worker in a thread of its own, connected by a LocalHub
(net/local.py); the mode layer opens it for `--parallel tensor` without MPI, and the tests use it.
"""
from __future__ import annotations

import threading

from ..net.local import LocalHub
from ..net.loss import LinkLoss
from ..store.hdf5 import Store
from .assemble import build
from .ending import stop_workers
from .lead import TensorParallelSession
from .plan import TensorPlan, emulated_loss


class LocalCluster:
    """Rank 0 in the calling thread, the other ranks in threads, connected by a LocalHub."""

    def __init__(self, store: Store, plan: TensorPlan, loss: LinkLoss | None = None, log=None,
                 speeds: bool = False):
        """speeds: measure the members' speeds (threads share one interpreter and its cores:
        their compute times say little of a device's, so not unless asked)."""
        self.plan = plan
        self.hub = LocalHub(plan.size, loss if loss is not None else emulated_loss(plan), plan.wire)
        for r in plan.members:
            self.hub.transports[r].group = tuple(plan.members)
        self.lead, self.model = build(store, plan, self.hub.transports[0], log, speeds)
        self.worker_stats: dict[int, dict] = {}
        self.threads = []
        for r in range(1, plan.size):
            part, _ = build(store, plan, self.hub.transports[r])
            th = threading.Thread(target=lambda p=part, r=r: self.worker_stats.__setitem__(r, p.run()),
                                  daemon=True, name=f"rank-{r}")
            th.start()
            self.threads.append(th)

    def session(self, max_len: int, prefill_chunk: int | None = None) -> TensorParallelSession:
        chunk = prefill_chunk or self.plan.options.prefill_chunk
        return TensorParallelSession(self.model, self.lead, max_len, chunk)

    def stop(self) -> dict[int, dict]:
        done = stop_workers(self.lead, timeout=30)
        for th in self.threads:
            th.join(timeout=30)
        return done
