"""One process (`--parallel none`): the reference model, whole or under a memory budget."""
from __future__ import annotations

import time

from ..loading.parts import budgeted_transformer, describe_loading
from ..model.batch import LocalBatch
from ..model.generate import LocalSession
from ..model.llama import Transformer
from ..model.tokenizer import Tokenizer
from ..options.tree import ModeOptions
from ..stats import RankStats, RunStats, SequenceStats, cpu_seconds, peak_rss_mb
from ..store.hdf5 import Store
from .engine import Engine, Prepare, Report, Workload, say


class SingleEngine(Engine):
    mode = "single"

    def __init__(self, options: ModeOptions, prepare: Prepare | None = None):
        super().__init__(options)
        # open to the end: a budgeted model reads from it
        self.store = Store(options.weights, verify=options.verify)
        self.weights = None
        try:
            self.tokenizer = Tokenizer.from_store(self.store)
            self.context = self.store.args.max_seq_len
            self.workload = prepare(self.tokenizer, self.context) if prepare else Workload()
            if options.load.mem_budget is not None:
                self.model, self.weights = budgeted_transformer(self.store, options.loading(), options.dtype)
                say(f"memory: {self.weights.describe()}")
            else:
                self.model = Transformer.from_store(self.store, dtype=options.dtype)
        except BaseException:
            self.close()
            raise
        self.wall_s = 0.0

    def _run(self, work):
        t0 = time.perf_counter()
        try:
            return work()
        finally:
            self.wall_s = time.perf_counter() - t0

    @property
    def max_batch(self) -> int:
        """--max-batch, when every block's attention has the ragged path (a memory budget that
        streams the attention has none: one sequence at a time then)."""
        return self.options.max_batch if self.model.batches() else 1

    def describe_batch(self) -> str:
        if self.max_batch > 1:
            return super().describe_batch()
        why = "--max-batch 1" if self.options.max_batch == 1 else "its memory budget streams the attention"
        return f"one sequence per step ({why})"

    def batch_model(self) -> LocalBatch:
        """The model as a batch; float32 weights are also kept in oneDNN's layout from its first
        step of two sequences or more (model/linear.py: several rows at about one row's cost;
        their memory twice). A budget's streamed weights are never packed."""
        return LocalBatch(self.model, pack=self.weights is None)

    def describe_mode(self) -> str:
        return "single process"

    def session(self, max_len: int) -> LocalSession:
        return LocalSession(self.model, max_len)

    def _report(self) -> Report:
        results = [job.result for job in self.jobs]
        loading = self.weights.stats() if self.weights is not None else None
        resident = loading["resident_bytes"] if loading else self.model.weight_bytes()
        lines = [r.summary() for r in results]
        packed = self.model.packed_bytes()
        lines.append(f"weights {resident / 1e6:.1f} MB resident"
                     + (f" (+{packed / 1e6:.1f} MB reordered for batched steps)" if packed else "")
                     + f", peak RSS {peak_rss_mb():.0f} MB")
        if loading:
            lines.append(describe_loading(loading, sum(len(r.tokens) for r in results)))
        decode_s = [s for r in results for s in r.decode_s]
        tokens_per_s = len(decode_s) / sum(decode_s) if decode_s else float("nan")
        stats = RunStats("single", 1, self.options.dtype,
                         [SequenceStats.of(job.index, job.result) for job in self.jobs],
                         [RankStats(0, peak_rss_mb(), cpu_seconds(), weight_bytes=resident,
                                    extra={"loading": loading} if loading else {"packed_bytes": packed})],
                         tokens_per_s, self.wall_s, config={"max_batch": self.max_batch})
        self.add_steps(stats, lines)
        return Report(lines, stats)

    def close(self):
        if self.weights is not None:
            self.weights.close()
            self.weights = None
        self.store.close()

