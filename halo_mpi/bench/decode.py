"""Single-process decode speed per store dtype and compute dtype, and where one step's time goes.

    halo-mpi bench --decode --dtypes float32,bfloat16 --profile
    halo-mpi bench --decode --store-dtypes float32,q8_0,q4 --eval-tokens 512
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from ..errors import HaloError
from ..model.evaluate import perplexity, teacher_forced_nll
from ..model.generate import LocalSession
from ..model.llama import Transformer
from ..model.quant import QUANT_DTYPES
from ..model.texts import evaluation_text
from ..model.tokenizer import Tokenizer
from ..store.hdf5 import Store

MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::addmv", "aten::mv",
              "aten::_weight_int4pack_mm_for_cpu"}


def store_for(weights: str, store_dtype: str) -> str:
    """The store of a dtype beside `weights`: weights itself when it has that dtype, else
    <stem>-<dtype>.h5 (as `make weights` writes them)."""
    with Store(weights) as s:
        if s.store_dtype == store_dtype:
            return weights
    stem, ext = os.path.splitext(weights)
    path = f"{stem}-{store_dtype}{ext}"
    if not os.path.exists(path):
        raise HaloError(f"no {store_dtype} store beside {weights}: write {path} with `halo-mpi convert "
                        f"<the .gguf> -o {path} --store-dtype {store_dtype}` (or `make weights`)")
    return path


def decode_times(model: Transformer, tokens: int, warmup: int, prompt_len: int = 16) -> list[float]:
    """Wall seconds of each decode step after `warmup` untimed ones (greedy, real token ids)."""
    cache = model.new_cache(prompt_len + warmup + tokens + 1)
    logits = model(torch.arange(prompt_len) + 100, cache, last_only=True)
    times = []
    for i in range(warmup + tokens):
        t0 = time.perf_counter()
        logits = model(logits[-1:].argmax(-1), cache, last_only=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def profile_decode(model: Transformer, steps: int = 10) -> dict:
    """Where one decode step's time goes: matmuls (weights), other ops, Python, the head alone."""
    from torch.profiler import profile
    cache = model.new_cache(64 + steps)
    logits = model(torch.arange(16) + 100, cache, last_only=True)
    for _ in range(5):
        logits = model(logits.argmax(-1), cache, last_only=True)
    with profile() as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model(logits.argmax(-1), cache, last_only=True)
        wall = (time.perf_counter() - t0) / steps
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / steps / 1e6
    other = sum(e.self_cpu_time_total for e in events if e.key not in MATMUL_OPS) / steps / 1e6
    h = torch.randn(1, model.args.dim)
    head = statistics.median(_timed(lambda: model.head(h)) for _ in range(20))
    return {"step_ms": 1e3 * wall, "matmul_ms": 1e3 * matmul, "other_ops_ms": 1e3 * other,
            "python_and_dispatch_ms": 1e3 * max(0.0, wall - matmul - other), "head_ms": 1e3 * head,
            "weights_mb": weight_bytes(model) / 1e6,
            "effective_gb_per_s": weight_bytes(model) / wall / 1e9}


def weight_bytes(model: Transformer) -> int:
    """Bytes of the matrices one decode step reads (the embedding table is not read whole)."""
    total = model.output.nbytes if model.output is not None else 0
    for b in model.blocks.values():
        total += b.attention.qkv.nbytes + b.attention.o.nbytes + b.feed_forward.nbytes
    return total


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_single(weights: str, dtypes: list[str], tokens: int, warmup: int, profile: bool,
                 store_dtypes: list[str] | None = None, eval_tokens: int = 0, log=print) -> list[dict]:
    """One row per (store dtype, compute dtype); compute dtypes apply to float32 and bfloat16
    stores (quantized weights have their own kernel). eval_tokens > 0 adds held-out perplexity."""
    rows = []
    for store_dtype in store_dtypes or [None]:
        path = weights if store_dtype is None else store_for(weights, store_dtype)
        with Store(path) as store:
            ids = (Tokenizer.from_store(store).encode(evaluation_text())[: eval_tokens + 1]
                   if eval_tokens > 0 else [])
            quantized = store.store_dtype in QUANT_DTYPES
            for dtype in (["bfloat16"] if quantized else dtypes):
                model = Transformer.from_store(store, dtype="float32" if quantized else dtype)
                with torch.inference_mode():
                    times = decode_times(model, tokens, warmup)
                    row = {"mode": "single", "store": path, "store_dtype": store.store_dtype,
                           "dtype": dtype, "threads": torch.get_num_threads(), "tokens": tokens,
                           "ms_per_token_median": 1e3 * statistics.median(times),
                           "ms_per_token_p95": 1e3 * sorted(times)[int(0.95 * (len(times) - 1))],
                           "tokens_per_s": len(times) / sum(times),
                           "store_mb": os.path.getsize(path) / 1e6,
                           "weights_mb": model.weight_bytes() / 1e6}
                    if ids:
                        nll = teacher_forced_nll(LocalSession(model, len(ids)), ids)
                        row.update(perplexity=perplexity(nll), eval_tokens=len(nll))
                    if profile:
                        row["profile"] = profile_decode(model)
                rows.append(row)
                log(format_row(row))
                del model
    return rows


def format_row(row: dict) -> str:
    compute = ("int4 kernel, bfloat16 activations" if row["store_dtype"] in QUANT_DTYPES
               else f"computed in {row['dtype']}")
    s = (f"{row['mode']} {row['store_dtype']:7s} store ({row['store_mb']:.0f} MB, {compute}), "
         f"threads={row['threads']}: median {row['ms_per_token_median']:.1f} ms/token, "
         f"p95 {row['ms_per_token_p95']:.1f}, {row['tokens_per_s']:.1f} tokens/s over {row['tokens']} "
         f"tokens; weights {row['weights_mb']:.0f} MB resident")
    if "perplexity" in row:
        s += f"; perplexity {row['perplexity']:.3f} over {row['eval_tokens']} held-out tokens"
    if "profile" in row:
        p = row["profile"]
        s += (f"\n  one decode step (profiled, {p['step_ms']:.1f} ms): matmuls {p['matmul_ms']:.1f} ms "
              f"({p['weights_mb']:.0f} MB of weights, {p['effective_gb_per_s']:.1f} GB/s over the step), "
              f"other ops {p['other_ops_ms']:.1f} ms, Python+dispatch {p['python_and_dispatch_ms']:.1f} ms; "
              f"the head alone {p['head_ms']:.1f} ms")
    return s
