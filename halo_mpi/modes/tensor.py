"""Tensor-parallel mode (`--parallel tensor`): under MPI, or its thread twin in one process.

Every rank opens its store, computes the plan (tensor/plan.py) and builds its part
(tensor/assemble.py); rank 0 prints the plan. A session is rank 0's `TensorParallelSession`; the
workers serve until rank 0 stops them at the end of the run.
"""
from __future__ import annotations

import time

from ..model.tokenizer import Tokenizer
from ..net.launch import collective
from ..options.tree import ModeOptions
from ..stats import cpu_seconds, peak_rss_mb
from ..store.hdf5 import Store
from ..tensor.assemble import residency
from ..tensor.lead import TensorBatch, TensorParallelSession
from ..tensor.local import LocalCluster
from ..tensor.plan import describe, make_plan, survey_links
from ..tensor.report import format_report, tensor_stats
from ..tensor.run import TensorRank, TensorRun, lost_ranks, members_comm
from .engine import Engine, Prepare, Report, Workload, say


class TensorEngine(Engine):
    """comm: MPI's communicator (every rank builds one), or None: `local_ranks` ranks as threads."""
    mode = "tensor"
    chunk_alone = True        # a step's messages are sized for --prefill-chunk rows (plan.py)

    def __init__(self, options: ModeOptions, comm=None, prepare: Prepare | None = None, log=None,
                 local_ranks: int = 1):
        rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, local_ranks)
        super().__init__(options, rank, size)
        self.comm, self.run = comm, None

        self.store = Store(options.store_path(rank), verify=options.verify) if comm is None else \
            collective(comm, lambda: Store(options.store_path(rank), verify=options.verify))
        try:
            # the links measured (every rank, once every store opened), then the plan
            survey = survey_links(comm, self.store, options)

            def setup():
                plan = make_plan(self.store, size, options, survey)
                residency(self.store, plan, rank)     # a budget too small: one line, before loading
                return plan, self._prepare(self.store, prepare) if rank == 0 else Workload()

            self.plan, self.workload = collective(comm, setup) if comm is not None else setup()
        except BaseException:
            self.store.close()
            raise
        try:
            # the members' communicator while every rank is known to be there (start-up)
            group = members_comm(comm, rank in self.plan.members) if comm is not None else None
            if rank == 0:
                say(describe(self.plan, self.store))
            if comm is not None:
                self.part = TensorRank(comm, self.store, self.plan, log, group)
            else:
                self.part = LocalCluster(self.store, self.plan, log=log)
            self.lead, self.model = self.part.lead, self.part.model
        except BaseException:
            self.store.close()
            raise

    def _prepare(self, store: Store, prepare: Prepare | None) -> Workload:
        self.tokenizer = Tokenizer.from_store(store)
        self.context = store.args.max_seq_len
        return prepare(self.tokenizer, self.context) if prepare else Workload()

    @property
    def links(self) -> dict:
        """rank -> its link's estimate (rank 0): on-time rates for progress lines and /health."""
        return self.lead.links if self.lead is not None else {}

    def describe_mode(self) -> str:
        sats = f", satellites {self.plan.satellites}" if self.plan.satellites else ""
        return f"tensor ({self.plan.policy.mode}, all-reduce among {self.plan.members}{sats})"

    def health(self) -> dict:
        return {**super().health(), "link_on_time_rate": {str(r): round(link.on_time_rate, 4)
                                                          for r, link in self.links.items()},
                **self.rank_figures()}

    def rank_figures(self, recent: int = 64) -> dict:
        """Rank 0, at any time (a server's /metrics): each rank's share of the MLP groups, its
        link's on-time rate, the layers its partial came late and the importance that cost per
        token, over the `recent` tokens; all the importance dropped per token over them."""
        if self.lead is None:
            return {}
        placement = list(self.lead.planner.placement)            # [layer][rank] -> group ids
        records = [rec for rec in list(self.lead.satellites.records[-recent:]) if rec.decoding]
        total = sum(len(ids) for layer in placement for ids in layer) or 1
        links = dict(self.links)
        rows = [{"rank": r,
                 "group_share": sum(len(layer[r]) for layer in placement if r < len(layer)) / total,
                 "on_time_rate": links[r].on_time_rate if r in links else 1.0,
                 "dropped_layers": sum(rec.dropped_ranks[r] for rec in records),
                 "dropped_share": sum(rec.dropped_by_rank[r] for rec in records) / max(len(records), 1)}
                for r in range(self.size)]
        dropped = sum(rec.dropped_share for rec in records) / len(records) if records else 0.0
        return {"rank_stats": rows, "dropped_share": dropped}

    def _run(self, work):
        if self.comm is not None:
            result, self.run = self.part.run(lambda lead, model: work())
            return result
        t0 = time.perf_counter()
        try:
            return work()
        finally:
            workers = self.part.stop()
            size = self.plan.size
            self.run = TensorRun(self.lead, workers, [0] * size, [peak_rss_mb()] * size,
                                 [cpu_seconds()] * size, time.perf_counter() - t0)

    @property
    def max_batch(self) -> int:
        return self.options.max_batch

    def batch_model(self) -> TensorBatch:
        """The model as a batch; float32 weights also kept in oneDNN's layout on every member
        from the first step that carries two sequences or more (Member.pack_for_batches)."""
        return TensorBatch(self.model, self.lead, self.max_batch)

    def describe_batch(self) -> str:
        if self.max_batch > 1:
            return (f"batches of up to {self.max_batch} sequences per step (continuous batching; "
                    f"each round of the step carries every sequence's rows)")
        return "one sequence per step (--max-batch 1)"

    def session(self, max_len: int) -> TensorParallelSession:
        return TensorParallelSession(self.model, self.lead, max_len, self.options.prefill_chunk)

    def _report(self) -> Report:
        jobs = sorted(self.jobs, key=lambda job: job.index)
        stats = tensor_stats(self.plan, self.run, [job.result for job in jobs])
        steps: list[str] = []
        self.add_steps(stats, steps)          # (first: it sets the tokens/s the report prints)
        return Report([format_report(stats)] + steps, stats, lost_ranks(self.run))

    def close(self):
        self.store.close()
