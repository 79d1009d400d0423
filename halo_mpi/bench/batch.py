"""Batched decode speed: one step over B sequences against one over a single sequence.

    halo-mpi bench --batch 1,2,4,8 --store-dtypes float32,q4 --tokens 48 --repeat 3
    halo-mpi bench --batch 1,2,4 --batch-modes single,strict,halo,pipeline --batch-ranks 2

Every B runs `tokens` decode steps per round after `warmup` untimed ones, each sequence on its
own prompt; the rounds take the batch sizes in turn, so that a noisy machine weighs on every B
alike; each row gives the median over all its rounds' steps. A step of B sequences yields B
tokens, one per sequence: ms/step is also each sequence's ms/token, tokens/s is B / step.
With --batch-modes strict,halo, tensor mode too (one mpiexec per mode and store dtype, each rank
with --threads threads: bench/rank.py's batch task times the same steps on rank 0).

Pipeline mode (--batch-modes pipeline): each B is one `mpiexec -n N` run per round
(bench/rank.py) with S = N x B sequences in flight and --max-batch B, so that every stage can
hold a batch of B while the others hold theirs (B = 1: the unbatched ring, N sequences in
flight). A ring's step and a sequence's token are different things there: ms/step is the
slowest stage's median step (its block over the sequences it took together; how many, on
average, is in the row), ms/token per sequence the median gap between a sequence's tokens after
`warmup`, tokens/s in total S / that gap. The N ranks share this machine's cores (each gets
cores / N threads): on one machine the ring's stages take turns on the same cores, which is not
what separate devices would give.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch

from ..errors import HaloError
from ..model.batch import BatchModel, LocalBatch
from ..model.llama import Transformer
from ..model.quant import QUANT_DTYPES
from ..net.launch import mpiexec_path
from ..options.tree import ModeOptions
from ..stats import RunStats
from ..store.hdf5 import Store
from .decode import store_for
from .rank import Task, command, last_line

PROMPT_LEN = 16
PIPELINE_PROMPT = "The history of the city of Paris begins"


def batch_step_times(model: BatchModel, batch: int, steps: int, warmup: int) -> list[float]:
    """Wall seconds of each of `steps` decode steps over `batch` sequences, after `warmup`."""
    states = [model.open(PROMPT_LEN + warmup + steps + 1) for _ in range(batch)]
    prompts = [[100 + 7 * i + t for t in range(PROMPT_LEN)] for i in range(batch)]
    logits = model.step(list(zip(states, prompts)))                       # (B, vocab)
    times = []
    for i in range(warmup + steps):
        ids = logits.argmax(-1).tolist()                                  # greedy, real tokens
        t0 = time.perf_counter()
        logits = model.step([(state, [t]) for state, t in zip(states, ids)])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    for state in states:
        model.close(state)
    return times


def measure_batches(model: BatchModel, batches: list[int], tokens: int, warmup: int,
                    repeat: int) -> dict[int, list[float]]:
    """B -> every timed step of its rounds; the rounds take the batch sizes in turn."""
    times: dict[int, list[float]] = {b: [] for b in batches}
    with torch.inference_mode():
        for _ in range(repeat):
            for b in batches:
                times[b] += batch_step_times(model, b, tokens, warmup)
    return times


@dataclass(frozen=True)
class BatchBench:
    """What `bench --batch` runs: each mode at each store dtype, each B."""
    weights: str
    batches: list[int]
    tokens: int
    warmup: int
    repeat: int
    store_dtypes: list[str] | None = None
    modes: tuple[str, ...] = ("single",)     # single, strict, halo (tensor mode's syncs), pipeline
    ranks: int = 2                           # tensor and pipeline mode's ranks
    threads: int = 1                         # torch threads per rank under mpiexec (0: cores / ranks)


def bench_batches(cfg: BatchBench, log=print) -> list[dict]:
    """One row per (store dtype, mode, B)."""
    rows = []
    for store_dtype in cfg.store_dtypes or [None]:
        path = cfg.weights if store_dtype is None else store_for(cfg.weights, store_dtype)
        with Store(path) as store:
            dtype = store.store_dtype
        for mode in cfg.modes:
            if mode == "pipeline":
                rows += pipeline_rows(path, dtype, cfg, log)
                continue
            times = single_times(path, cfg) if mode == "single" else tensor_times(path, mode, cfg)
            for b in cfg.batches:
                rows.append(batch_row(mode if mode == "single" else f"tensor {mode} -n {cfg.ranks}",
                                      path, dtype, b, times[b], times[cfg.batches[0]],
                                      torch.get_num_threads() if mode == "single" else cfg.threads))
                log(format_batch_row(rows[-1]))
    return rows


def single_times(path: str, cfg: BatchBench) -> dict[int, list[float]]:
    with Store(path) as store:
        model = Transformer.from_store(store)
    model.pack_for_batches()                  # as a batching engine does
    return measure_batches(LocalBatch(model), cfg.batches, cfg.tokens, cfg.warmup, cfg.repeat)


def tensor_times(path: str, sync: str, cfg: BatchBench) -> dict[int, list[float]]:
    """The same steps in tensor mode: one mpiexec of bench/rank.py's batch task."""
    options = ModeOptions.of(weights=path, parallel="tensor", sync=sync, threads=cfg.threads,
                             max_batch=max(cfg.batches))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "batch.json")
        task = Task("batch", new_tokens=cfg.tokens, out=out,
                    batches=",".join(map(str, cfg.batches)), warmup=cfg.warmup, repeat=cfg.repeat)
        done = subprocess.run([mpiexec_path(), "-n", str(cfg.ranks), *command(options, task)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise HaloError(f"tensor {sync} -n {cfg.ranks} on {path} failed (exit {done.returncode}): "
                            f"{last_line(done.stderr)}")
        with open(out) as f:
            return {int(b): t for b, t in json.load(f).items()}


def pipeline_rows(path: str, store_dtype: str, cfg: BatchBench, log=print,
                  timeout: float = 900.0) -> list[dict]:
    """One row per B: the ring at -n ranks (see the module), the B in turn each round."""
    runs: dict[int, list[RunStats]] = {b: [] for b in cfg.batches}
    for _ in range(cfg.repeat):
        for b in cfg.batches:
            runs[b].append(pipeline_run(path, b, cfg.ranks, cfg.tokens, cfg.warmup, cfg.threads, timeout))
    rows = []
    for b in cfg.batches:
        rows.append(pipeline_row(path, store_dtype, b, cfg.ranks, runs[b], cfg.warmup))
        log(format_pipeline_row(rows[-1]))
    return rows


def pipeline_run(path: str, batch: int, ranks: int, tokens: int, warmup: int, threads: int,
                 timeout: float) -> RunStats:
    """One generate of ranks x batch greedy sequences on the ring under mpiexec: its statistics."""
    options = ModeOptions.of(parallel="pipeline", weights=path, max_batch=batch, threads=threads,
                             num_sequences=ranks * batch)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gen.json")
        task = Task("generate", PIPELINE_PROMPT, warmup + tokens + 1, out=out, sequences=ranks * batch)
        done = subprocess.run([mpiexec_path(), "-n", str(ranks), *command(options, task)],
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise HaloError(f"bench --batch: the pipeline run at -n {ranks}, B={batch} failed: "
                            f"{last_line(done.stderr)}")
        with open(out) as f:
            return RunStats.from_json(json.load(f))


def pipeline_row(path: str, store_dtype: str, batch: int, ranks: int, runs: list[RunStats],
                 warmup: int) -> dict:
    gaps = [ms for run in runs for s in run.sequences for ms in s.decode_ms[warmup:]]
    per_token = statistics.median(gaps)
    stage_ms = [statistics.median(r.extra["step_ms_median"] for r in (run.ranks[k] for run in runs))
                for k in range(ranks)]
    by_batch: dict[int, int] = {}
    for run in runs:
        for r in run.ranks:
            for b, n in r.extra["steps_by_batch"].items():
                by_batch[int(b)] = by_batch.get(int(b), 0) + n
    return {"mode": "pipeline", "ranks": ranks, "store": path, "store_dtype": store_dtype,
            "threads_per_rank": runs[0].ranks[0].extra.get("threads"),
            "batch": batch, "in_flight": ranks * batch, "tokens": len(gaps),
            "ms_per_step_median": max(stage_ms), "stage_ms_per_step": stage_ms,
            "sequences_per_step_mean": sum(b * n for b, n in by_batch.items()) / sum(by_batch.values()),
            "steps_by_batch": dict(sorted(by_batch.items())),
            "ms_per_token_per_sequence": per_token, "tokens_per_s": ranks * batch * 1e3 / per_token,
            "run_tokens_per_s": statistics.median(run.tokens_per_s for run in runs)}


def format_pipeline_row(row: dict) -> str:
    return (f"pipeline -n {row['ranks']} {row['store_dtype']:7s} B={row['batch']} ({row['in_flight']} "
            f"in flight): median {row['ms_per_step_median']:.1f} ms/step (slowest stage; "
            f"{row['sequences_per_step_mean']:.1f} sequences a step on average), "
            f"{row['tokens_per_s']:.1f} tokens/s in total, {row['ms_per_token_per_sequence']:.1f} "
            f"ms/token per sequence, over {row['tokens']} tokens")


def batch_row(mode: str, path: str, store_dtype: str, batch: int, times: list[float],
              first: list[float], threads: int) -> dict:
    step = statistics.median(times)
    base = statistics.median(first)
    return {"mode": mode, "store": path, "store_dtype": store_dtype,
            "compute": ("int4 kernel, bfloat16 activations" if store_dtype in QUANT_DTYPES
                        else "float32: MKL sgemv for one row, oneDNN on reordered weights for more"),
            "threads": threads, "batch": batch, "steps": len(times),
            "ms_per_step_median": 1e3 * step,
            "ms_per_step_p95": 1e3 * sorted(times)[int(0.95 * (len(times) - 1))],
            "tokens_per_s": batch / step,
            "ms_per_token_per_sequence": 1e3 * step,
            "step_vs_first": step / base,                 # the step's time against the first B's
            "tokens_per_s_vs_first": (batch / step) / (1 / base),
            "store_mb": os.path.getsize(path) / 1e6}


def format_batch_row(row: dict) -> str:
    return (f"{row['mode']} {row['store_dtype']:7s} B={row['batch']}: median {row['ms_per_step_median']:.1f} "
            f"ms/step (p95 {row['ms_per_step_p95']:.1f}; {row['step_vs_first']:.2f}x the first B's), "
            f"{row['tokens_per_s']:.1f} tokens/s in total ({row['tokens_per_s_vs_first']:.2f}x), "
            f"{row['ms_per_token_per_sequence']:.1f} ms/token per sequence, over {row['steps']} steps")


def plot_batches(rows: list[dict], path: str) -> bool:
    """tokens/s and ms/step against B, a line per mode and store dtype; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (rate, step) = plt.subplots(1, 2, figsize=(10, 4))
    for line in dict.fromkeys((r["mode"], r["store_dtype"]) for r in rows):
        mine = [r for r in rows if (r["mode"], r["store_dtype"]) == line]
        label = " ".join(line)
        rate.plot([r["batch"] for r in mine], [r["tokens_per_s"] for r in mine], "o-", label=label)
        step.plot([r["batch"] for r in mine], [r["ms_per_step_median"] for r in mine], "o-", label=label)
    rate.set(xlabel="sequences per step (B)", ylabel="tokens/s in total", title="throughput")
    step.set(xlabel="sequences per step (B)", ylabel="ms/step (median)", title="step time")
    for ax in (rate, step):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
