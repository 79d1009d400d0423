"""Batched decode speed: one step over B sequences against one over a single sequence.

    halo-mpi bench --batch 1,2,4,8 --store-dtypes float32,q4 --tokens 48 --repeat 3

Every B runs `tokens` decode steps per round after `warmup` untimed ones, each sequence on its
own prompt; the rounds take the batch sizes in turn, so that a noisy machine weighs on every B
alike; each row gives the median over all its rounds' steps. A step of B sequences yields B
tokens, one per sequence: ms/step is also each sequence's ms/token, tokens/s is B / step.
Only the single process batches for now: the other modes are named as such, with no figure.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from ..model.llama import Transformer
from ..model.quant import QUANT_DTYPES
from ..store.hdf5 import Store
from .decode import store_for

PROMPT_LEN = 16
UNBATCHED = {"tensor": "one sequence per step (tensor mode does not batch yet)",
             "pipeline": "one sequence per stage per step (its ring keeps --num-sequences in flight "
                         "instead)"}


def batch_step_times(model: Transformer, batch: int, steps: int, warmup: int) -> list[float]:
    """Wall seconds of each of `steps` decode steps over `batch` sequences, after `warmup`."""
    caches = [model.new_cache(PROMPT_LEN + warmup + steps + 1) for _ in range(batch)]
    prompts = [[100 + 7 * i + t for t in range(PROMPT_LEN)] for i in range(batch)]
    logits = model.step(list(zip(caches, prompts)))                       # (B, vocab)
    times = []
    for i in range(warmup + steps):
        ids = logits.argmax(-1).tolist()                                  # greedy, real tokens
        t0 = time.perf_counter()
        logits = model.step([(cache, [t]) for cache, t in zip(caches, ids)])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def bench_batches(weights: str, batches: list[int], tokens: int, warmup: int, repeat: int,
                  store_dtypes: list[str] | None = None, log=print) -> list[dict]:
    """One row per (store dtype, B)."""
    rows = []
    for store_dtype in store_dtypes or [None]:
        path = weights if store_dtype is None else store_for(weights, store_dtype)
        with Store(path) as store:
            model = Transformer.from_store(store)
            model.pack_for_batches()                  # as a batching engine does
            dtype = store.store_dtype
        times: dict[int, list[float]] = {b: [] for b in batches}
        with torch.inference_mode():
            for _ in range(repeat):
                for b in batches:
                    times[b] += batch_step_times(model, b, tokens, warmup)
        for b in batches:
            rows.append(batch_row(path, dtype, b, times[b], times[batches[0]]))
            log(format_batch_row(rows[-1]))
        del model
    for mode, why in UNBATCHED.items():
        log(f"{mode}: {why}; no batched figure")
    return rows


def batch_row(path: str, store_dtype: str, batch: int, times: list[float], first: list[float]) -> dict:
    step = statistics.median(times)
    base = statistics.median(first)
    return {"mode": "single", "store": path, "store_dtype": store_dtype,
            "compute": ("int4 kernel, bfloat16 activations" if store_dtype in QUANT_DTYPES
                        else "float32: MKL sgemv for one row, oneDNN on reordered weights for more"),
            "threads": torch.get_num_threads(), "batch": batch, "steps": len(times),
            "ms_per_step_median": 1e3 * step,
            "ms_per_step_p95": 1e3 * sorted(times)[int(0.95 * (len(times) - 1))],
            "tokens_per_s": batch / step,
            "ms_per_token_per_sequence": 1e3 * step,
            "step_vs_first": step / base,                 # the step's time against the first B's
            "tokens_per_s_vs_first": (batch / step) / (1 / base),
            "store_mb": os.path.getsize(path) / 1e6}


def format_batch_row(row: dict) -> str:
    return (f"single {row['store_dtype']:7s} B={row['batch']}: median {row['ms_per_step_median']:.1f} "
            f"ms/step (p95 {row['ms_per_step_p95']:.1f}; {row['step_vs_first']:.2f}x the first B's), "
            f"{row['tokens_per_s']:.1f} tokens/s in total ({row['tokens_per_s_vs_first']:.2f}x), "
            f"{row['ms_per_token_per_sequence']:.1f} ms/token per sequence, over {row['steps']} steps")


def plot_batches(rows: list[dict], path: str) -> bool:
    """tokens/s and ms/step against B, a line per store dtype; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (rate, step) = plt.subplots(1, 2, figsize=(10, 4))
    for dtype in dict.fromkeys(r["store_dtype"] for r in rows):
        mine = [r for r in rows if r["store_dtype"] == dtype]
        rate.plot([r["batch"] for r in mine], [r["tokens_per_s"] for r in mine], "o-", label=dtype)
        step.plot([r["batch"] for r in mine], [r["ms_per_step_median"] for r in mine], "o-", label=dtype)
    rate.set(xlabel="sequences per step (B)", ylabel="tokens/s in total", title="throughput")
    step.set(xlabel="sequences per step (B)", ylabel="ms/step (median)", title="step time")
    for ax in (rate, step):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
