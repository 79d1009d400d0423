"""Benchmarks: figures in the README come from here, medians measured in one run.

    halo-mpi bench --weights weights/smollm2-135m.h5 --modes single --dtypes float32,float16 --profile
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .errors import HaloError

from .model import Transformer
from .store import Store

MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::addmv", "aten::mv"}


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
    total = model.output.nbytes if model.output is not None else 0
    for b in model.blocks.values():
        total += b.attention.qkv.nbytes + b.attention.o.nbytes + b.feed_forward.nbytes
    return total


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_single(weights: str, dtypes: list[str], tokens: int, warmup: int, profile: bool, log=print) -> list[dict]:
    rows = []
    with Store(weights) as store:
        for dtype in dtypes:
            model = Transformer.from_store(store, dtype=dtype)
            with torch.inference_mode():
                times = decode_times(model, tokens, warmup)
                row = {"mode": "single", "dtype": dtype, "threads": torch.get_num_threads(),
                       "tokens": tokens, "ms_per_token_median": 1e3 * statistics.median(times),
                       "ms_per_token_p95": 1e3 * sorted(times)[int(0.95 * (len(times) - 1))],
                       "tokens_per_s": len(times) / sum(times)}
                if profile:
                    row["profile"] = profile_decode(model)
            rows.append(row)
            log(format_row(row))
            del model
    return rows


def format_row(row: dict) -> str:
    s = (f"{row['mode']:8s} {row['dtype']:9s} threads={row['threads']} median {row['ms_per_token_median']:.1f} "
         f"ms/token, p95 {row['ms_per_token_p95']:.1f}, {row['tokens_per_s']:.1f} tokens/s "
         f"over {row['tokens']} tokens")
    if "profile" in row:
        p = row["profile"]
        s += (f"\n  one decode step (profiled, {p['step_ms']:.1f} ms): matmuls {p['matmul_ms']:.1f} ms "
              f"({p['weights_mb']:.0f} MB of weights, {p['effective_gb_per_s']:.1f} GB/s over the step), "
              f"other ops {p['other_ops_ms']:.1f} ms, Python+dispatch {p['python_and_dispatch_ms']:.1f} ms; "
              f"the head alone {p['head_ms']:.1f} ms")
    return s


def write_json(rows: list[dict], path: str):
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)


# ---------------------------------------------------------------------------------------------
# distributed modes under loss: one mpiexec per run, the results the issue asks for

PROMPT = "The history of the city begins"
MODES = {  # mode -> generate/evaluate options
    "single": [],
    "strict": ["--parallel", "tensor", "--sync", "strict"],
    "halo": ["--parallel", "tensor", "--sync", "halo"],
    "halo-static": ["--parallel", "tensor", "--sync", "halo", "--placement", "static"],
    "halo-random": ["--parallel", "tensor", "--sync", "halo", "--placement", "random"],
    "halo-backup": ["--parallel", "tensor", "--sync", "halo", "--backup-share", "1"],
    "halo-backup-half": ["--parallel", "tensor", "--sync", "halo", "--backup-share", "0.5"],
    "pipeline": ["--parallel", "pipeline"],
}
LOSSLESS_ONLY = {"single", "pipeline"}   # no links that the emulated loss applies to


@dataclass
class BenchConfig:
    weights: str
    ranks: int
    modes: list[str]
    losses: list[float]
    lossy_ranks: list[int]
    tokens: int = 64
    warmup: int = 8
    eval_tokens: int = 128
    net: str = "emulated"
    out: str = "results"
    timeout: float = 1800.0
    extra: list[str] = field(default_factory=list)


def halo_command(cfg: BenchConfig, mode: str, loss: float, sub: str, out_json: str) -> list[str]:
    n = 1 if mode == "single" else cfg.ranks
    cmd = [sys.executable, "-m", "halo_mpi.cli", sub, "--weights", cfg.weights, *MODES[mode], *cfg.extra]
    if loss > 0 and mode not in LOSSLESS_ONLY and cfg.net == "emulated":
        cmd += ["--link-loss", ",".join(f"{r}:{loss}" for r in cfg.lossy_ranks)]
    elif loss > 0 and mode not in LOSSLESS_ONLY:   # testbed: the kernel drops; mark who is unstable
        cmd += ["--unstable-ranks", ",".join(map(str, cfg.lossy_ranks))]
    if sub == "generate":
        cmd += ["--prompt", PROMPT, "--max-new-tokens", str(cfg.warmup + cfg.tokens + 1), "--temperature", "0",
                "--ignore-eos", "--quiet", "--stats-json", out_json]
    else:
        cmd += ["--tokens", str(cfg.eval_tokens), "--json", out_json]
    return n, cmd


def launch(cfg: BenchConfig, n: int, cmd: list[str], loss: float):
    if cfg.net == "testbed" and n > 1:
        from .testbed import Testbed    # real kernel packet loss, one namespace per rank
        with Testbed(n, {r: loss for r in cfg.lossy_ranks} if loss > 0 else {}) as tb:
            done = tb.run(cmd[3:], module="halo_mpi.cli", timeout=cfg.timeout, capture=True)
            drops = tb.drop_counters()
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise HaloError(f"bench run on the testbed failed: {tail}")
        done.drops = drops
        return done
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    full = [mpiexec, "-n", str(n), *cmd]
    done = subprocess.run(full, capture_output=True, text=True, timeout=cfg.timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise HaloError(f"bench run failed ({' '.join(full[:12])} ...): {tail}")
    return done


def run_one(cfg: BenchConfig, mode: str, loss: float, tmp: str) -> dict:
    gen_json, eval_json = os.path.join(tmp, "gen.json"), os.path.join(tmp, "eval.json")
    n, cmd = halo_command(cfg, mode, loss, "generate", gen_json)
    launch(cfg, n, cmd, loss)
    stats = json.load(open(gen_json))
    decode_ms = stats.get("decode_ms") or [1e3 * s for seq in stats.get("sequences", []) for s in seq.get("decode_s", [])]
    timed = decode_ms[cfg.warmup:] if len(decode_ms) > cfg.warmup else decode_ms
    row = {"mode": mode, "loss": loss, "tokens": len(timed),
           "ms_per_token_median": float(statistics.median(timed)) if timed else float("nan"),
           "ms_per_token_p95": float(np.quantile(timed, 0.95)) if timed else float("nan"),
           "ms_per_token_mean": float(np.mean(timed)) if timed else float("nan"),
           "dropped_share": float(stats.get("dropped_share_mean", 0.0)),
           "peak_rss_mb": [float(r.get("peak_rss_mb", 0.0)) for r in stats.get("ranks", [])],
           "generated": next(iter(stats.get("sequences", [])), {}).get("tokens", [])}
    if mode == "pipeline":
        row["perplexity"] = None      # pipeline mode is exact (tested equal to the reference)
    else:
        n, cmd = halo_command(cfg, mode, loss, "evaluate", eval_json)
        launch(cfg, n, cmd, loss)
        row["perplexity"] = float(json.load(open(eval_json))["perplexity"])
    return row


def agreement(tokens: list[int], reference: list[int]) -> float:
    n = min(len(tokens), len(reference))
    return sum(a == b for a, b in zip(tokens[:n], reference[:n])) / n if n else float("nan")


def run_bench(cfg: BenchConfig, log=print) -> dict:
    import tempfile
    from .store import Store
    with Store(cfg.weights) as s:
        model_name = s.name
    runs, reference = [], None
    plan = [(m, l) for m in cfg.modes for l in (cfg.losses if m not in LOSSLESS_ONLY else [0.0])]
    if "single" not in cfg.modes:
        plan.insert(0, ("single", 0.0))      # the reference for token agreement
    with tqdm(plan, desc="bench runs", unit="run") as bar, tempfile.TemporaryDirectory() as tmp:
        for mode, loss in bar:
            bar.set_postfix_str(f"{mode} loss {loss:g}")
            row = run_one(cfg, mode, loss, tmp)
            if mode == "single":
                reference = row["generated"]
            row["agreement"] = agreement(row["generated"], reference or [])
            if mode in cfg.modes:
                runs.append(row)
            bar.write(f"{mode:12s} loss {loss:<5g} {row['ms_per_token_median']:8.1f} ms/token (p95 "
                      f"{row['ms_per_token_p95']:.1f})  ppl {row['perplexity'] or float('nan'):.3f}  "
                      f"agreement {row['agreement']:.3f}  dropped {row['dropped_share']:.4f}")
    for r in runs:
        r.pop("generated")
    return {"model": model_name, "ranks": cfg.ranks, "net": cfg.net, "lossy_ranks": cfg.lossy_ranks,
            "machine": machine_description(), "tokens": cfg.tokens, "warmup": cfg.warmup,
            "eval_tokens": cfg.eval_tokens, "runs": runs}


def machine_description() -> str:
    import platform
    cpu = "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}"


def write_results(results: dict, out: str, command: str):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(results_markdown(results, command))
    plotted = plot_results(results, os.path.join(out, "results.png"))
    return plotted


def results_markdown(r: dict, command: str) -> str:
    lines = [f"# halo-mpi bench: {r['model']}, {r['ranks']} ranks, {r['net']} loss on ranks "
             f"{r['lossy_ranks']}", "", f"Command: `{command}`", "", f"Machine: {r['machine']}; all "
             f"ranks share these cores. {r['tokens']} timed decode tokens after {r['warmup']} warm-up; "
             f"perplexity teacher-forced over {r['eval_tokens']} held-out tokens.", "",
             "| mode | loss | median ms/token | p95 ms/token | mean ms/token | perplexity | agreement | dropped share | peak RSS MB per rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        ppl = f"{x['perplexity']:.3f}" if x["perplexity"] is not None else "(exact)"
        lines.append(f"| {x['mode']} | {x['loss']:g} | {x['ms_per_token_median']:.1f} | {x['ms_per_token_p95']:.1f} "
                     f"| {x['ms_per_token_mean']:.1f} "
                     f"| {ppl} | {x['agreement']:.3f} | {x['dropped_share']:.4f} | "
                     f"{', '.join(f'{v:.0f}' for v in x['peak_rss_mb'])} |")
    by = {(x["mode"], x["loss"]): x for x in r["runs"]}
    speedups = [f"{l:g}: {by[('strict', l)]['ms_per_token_median'] / by[('halo', l)]['ms_per_token_median']:.2f}x"
                for (m, l) in sorted(by) if m == "halo" and ("strict", l) in by]
    if speedups:
        lines += ["", "Speedup of halo over strict (median ms/token) at each loss rate: " + ", ".join(speedups)]
    return "\n".join(lines) + "\n"


def plot_results(r: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(x["mode"] for x in r["runs"]):
        xs = [x for x in r["runs"] if x["mode"] == mode]
        a1.plot([x["loss"] * 100 for x in xs], [x["ms_per_token_median"] for x in xs], "o-", label=mode)
        if all(x["perplexity"] is not None for x in xs):
            a2.plot([x["loss"] * 100 for x in xs], [x["perplexity"] for x in xs], "o-", label=mode)
    a1.set(xlabel="packet loss on lossy ranks (%)", ylabel="median ms/token", yscale="log",
           title=f"{r['model']}, {r['ranks']} ranks ({r['net']})")
    a2.set(xlabel="packet loss on lossy ranks (%)", ylabel="perplexity (held-out)")
    a1.legend(), a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ---------------------------------------------------------------------------------------------
# fitting the emulated loss model to real kernel TCP (root, testbed)

CAL_SIZES = (1024, 2336, 8192)   # one segment; one layer message of SmolLM2 (576 floats + header); 6 segments


def fit_loss_model(real: dict, mtu: int = 1500) -> dict:
    """LinkLoss('tcp') parameters from testbed one-way delays: real[loss][size] -> samples (ms)."""
    multi, single, double, fast, fast_delays = [], [], [], [], []
    for loss, by_size in real.items():
        if loss <= 0:
            continue
        for size, xs in by_size.items():
            xs = np.asarray(xs)
            stalls = (xs >= 100).mean()
            (multi if -(-size // mtu) > 1 else single).append(stalls / loss)
            if stalls > 0:
                double.append((xs >= 300).mean() / stalls / loss)
            quick = xs[(xs >= 1) & (xs < 100)]
            fast.append(len(quick) / len(xs) / loss)
            fast_delays.extend(quick.tolist())
    mean = lambda v, d: float(np.mean(v)) if v else d     # noqa: E731
    lo, hi = (np.quantile(fast_delays, [0.05, 0.95]) if len(fast_delays) > 10 else (1.0, 10.0))
    return {"stall_per_p": mean(multi, 1.2), "single_per_p": mean(single, 0.2),
            "double_per_p": mean(double, 3.5), "fast_per_p": mean(fast, 2.5),
            "fast_lo_ms": float(max(lo, 1.0)), "fast_hi_ms": float(max(hi, 1.5))}


def emulated_samples(base_ms: list[float], loss: float, size: int, n: int, params: dict, seed: int = 0):
    """The emulation over the same network: a loss-free testbed delay plus the emulated hold."""
    from .comm import LinkLoss
    model = LinkLoss({1: loss}, seed=seed, **params)
    rng = np.random.default_rng(seed)
    base = np.asarray(base_ms)
    return [float(rng.choice(base)) + 1e3 * model.delay(0 if i % 2 else 1, 1 if i % 2 else 0, size)
            for i in range(n)]


def calibrate_emulation(losses: list[float], out: str, count: int = 1000, log=print) -> dict:
    from .testbed import Testbed, measure_delays, summarize
    real: dict[float, dict[int, list[float]]] = {}
    with Testbed(2, {1: 0.0}) as tb:
        for loss in tqdm([0.0] + [l for l in losses if l > 0], desc="testbed delays", unit="loss"):
            res = measure_delays(tb, list(CAL_SIZES), loss, count)
            real[loss] = {s: res["sizes"][str(s)]["forward_ms"] + res["sizes"][str(s)]["back_ms"]
                          for s in CAL_SIZES}
    params = fit_loss_model(real)
    rows = []
    for loss in (l for l in sorted(real) if l > 0):
        for size in CAL_SIZES:
            r = summarize(real[loss][size])
            e = summarize(emulated_samples(real[0.0][size], loss, size, len(real[loss][size]), params))
            ratio = {q: max(r[q], e[q]) / max(min(r[q], e[q]), 1e-9) for q in ("p95", "p99")}
            rows.append({"loss": loss, "size": size, "real": r, "emulated": e,
                         "p95_ratio": ratio["p95"], "p99_ratio": ratio["p99"],
                         "within_2x": ratio["p95"] <= 2 and ratio["p99"] <= 2})
    result = {"fitted_params": params, "count": count, "rows": rows,
              "real_loss_free": {s: summarize(real[0.0][s]) for s in CAL_SIZES}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(calibration_markdown(result))
    return result


def calibration_markdown(r: dict) -> str:
    p = r["fitted_params"]
    lines = ["# Emulated loss vs real kernel TCP (testbed, 2 ranks, loss on rank 1's link)", "",
             f"One-way arrival delays of ping-pong messages, {r['count']} round trips per cell. "
             "Emulated = a loss-free testbed delay plus the `tcp` model's hold, with the parameters "
             f"fitted from these measurements: stall_per_p {p['stall_per_p']:.2f}, single_per_p "
             f"{p['single_per_p']:.2f}, double_per_p {p['double_per_p']:.2f}, fast_per_p "
             f"{p['fast_per_p']:.2f}.", "",
             "| loss | bytes | real median / p95 / p99 / max (ms) | emulated median / p95 / p99 / max (ms) | p95, p99 ratio | within 2x |",
             "|---|---|---|---|---|---|"]
    fmt = lambda s: f"{s['median']:.2f} / {s['p95']:.1f} / {s['p99']:.1f} / {s['max']:.0f}"  # noqa: E731
    for x in r["rows"]:
        lines.append(f"| {x['loss']:g} | {x['size']} | {fmt(x['real'])} | {fmt(x['emulated'])} | "
                     f"{x['p95_ratio']:.1f}x, {x['p99_ratio']:.1f}x | {'yes' if x['within_2x'] else 'no'} |")
    return "\n".join(lines) + "\n"
