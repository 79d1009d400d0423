"""Benchmark of the modes under packet loss: one mpiexec per mode and loss rate, one results table.

    halo-mpi bench --ranks 4 --modes single,strict,halo --loss 0,0.01,0.05 --out results

Every run writes its `--stats-json` (halo_mpi/stats.py) and the bench reads them back; the
figures in the README come from here, medians measured in one run.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, replace

import numpy as np
from tqdm import tqdm

from ..errors import HaloError
from ..net.launch import mpiexec_path
from ..options.tree import ModeOptions
from ..stats import RunStats, write_json
from ..store.hdf5 import Store
from ..testbed.bed import Testbed
from .rank import Task, command, last_line

PROMPT = "The history of the city begins"
MODES = {  # mode -> what it sets in the mode options
    "single": {"parallel": "none"},
    "strict": {"parallel": "tensor", "sync": "strict"},
    "halo": {"parallel": "tensor", "sync": "halo"},
    "halo-pure": {"parallel": "tensor", "sync": "halo", "backup_share": 0.0},
    "halo-static": {"parallel": "tensor", "sync": "halo", "placement": "static"},
    "halo-random": {"parallel": "tensor", "sync": "halo", "placement": "random"},
    "halo-backup": {"parallel": "tensor", "sync": "halo", "backup_share": 1.0},
    "halo-backup-half": {"parallel": "tensor", "sync": "halo", "backup_share": 0.5},
    "pipeline": {"parallel": "pipeline"},
}
LOSSLESS_ONLY = {"single", "pipeline"}   # no links that the emulated loss applies to


@dataclass
class BenchConfig:
    base: ModeOptions                # --weights, --dtype, --threads, --wire-dtype for every run
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
    rto_min_ms: float | None = None  # testbed: TCP's minimum retransmission timeout (None: 200 ms)


def run_options(cfg: BenchConfig, mode: str, loss: float) -> ModeOptions:
    """The mode options of one run: the base ones with the mode's settings and the loss."""
    settings = dict(MODES[mode])
    parallel = settings.pop("parallel")
    tensor = replace(cfg.base.tensor, **settings)
    lossy = loss > 0 and mode not in LOSSLESS_ONLY
    if lossy and cfg.net == "emulated":
        tensor = replace(tensor, link_loss={r: loss for r in cfg.lossy_ranks})
    elif lossy:                                    # testbed: the kernel drops; mark who is unstable
        tensor = replace(tensor, unstable_ranks=frozenset(cfg.lossy_ranks))
    return replace(cfg.base, parallel=parallel, tensor=tensor)


def launch(cfg: BenchConfig, options: ModeOptions, task: Task, loss: float):
    """One run of `task` in the mode `options` open: mpiexec, or on the testbed's namespaces."""
    n = 1 if options.parallel == "none" else cfg.ranks
    cmd = command(options, task)
    if cfg.net == "testbed" and n > 1:
        with Testbed(n, {r: loss for r in cfg.lossy_ranks} if loss > 0 else {},
                     rto_min_ms=cfg.rto_min_ms) as tb:
            done = tb.run(cmd[3:], module="mpi4py", timeout=cfg.timeout, capture=True)
            drops = tb.drop_counters()
        if done.returncode != 0:
            raise HaloError(f"bench run on the testbed failed: {last_line(done.stderr)}")
        done.drops = drops
        return done
    full = [mpiexec_path(), "-n", str(n), *cmd]
    done = subprocess.run(full, capture_output=True, text=True, timeout=cfg.timeout)
    if done.returncode != 0:
        raise HaloError(f"bench run failed ({options.parallel}, {options.tensor.sync}, loss {loss:g}): "
                        f"{last_line(done.stderr)}")
    return done


def run_one(cfg: BenchConfig, mode: str, loss: float, tmp: str) -> dict:
    gen_json, eval_json = os.path.join(tmp, "gen.json"), os.path.join(tmp, "eval.json")
    options = run_options(cfg, mode, loss)
    launch(cfg, options, Task("generate", PROMPT, cfg.warmup + cfg.tokens + 1, out=gen_json), loss)
    with open(gen_json) as f:
        stats = RunStats.from_json(json.load(f))
    decode_ms = stats.decode_ms
    timed = decode_ms[cfg.warmup:] if len(decode_ms) > cfg.warmup else decode_ms
    row = {"mode": mode, "loss": loss, "tokens": len(timed),
           "wire": stats.config["wire"]["wire"] if stats.mode == "tensor" else "-",
           "ms_per_token_median": float(statistics.median(timed)) if timed else float("nan"),
           "ms_per_token_p95": float(np.quantile(timed, 0.95)) if timed else float("nan"),
           "ms_per_token_mean": float(np.mean(timed)) if timed else float("nan"),
           "dropped_share": (float(np.mean(stats.dropped_share_per_token))
                             if stats.dropped_share_per_token else 0.0),
           "peak_rss_mb": [r.peak_rss_mb for r in stats.ranks],
           "generated": stats.sequences[0].tokens}
    if mode == "pipeline":
        row["perplexity"] = None      # pipeline mode is exact (tested equal to the reference)
    else:
        launch(cfg, options, Task("evaluate", eval_tokens=cfg.eval_tokens, out=eval_json), loss)
        with open(eval_json) as f:
            row["perplexity"] = float(json.load(f)["perplexity"])
    return row


def agreement(tokens: list[int], reference: list[int]) -> float:
    n = min(len(tokens), len(reference))
    return sum(a == b for a, b in zip(tokens[:n], reference[:n])) / n if n else float("nan")


def run_bench(cfg: BenchConfig, log=print) -> dict:
    with Store(cfg.base.weights) as s:
        model_name = s.name
    runs, reference, single_ms = [], None, None
    plan = [(m, l) for m in cfg.modes for l in (cfg.losses if m not in LOSSLESS_ONLY else [0.0])]
    if "single" not in cfg.modes:
        plan.insert(0, ("single", 0.0))      # the reference for token agreement
    with tqdm(plan, desc="bench runs", unit="run") as bar, tempfile.TemporaryDirectory() as tmp:
        for mode, loss in bar:
            bar.set_postfix_str(f"{mode} loss {loss:g}")
            row = run_one(cfg, mode, loss, tmp)
            if mode == "single":
                reference, single_ms = row["generated"], row["ms_per_token_median"]
            row["agreement"] = agreement(row["generated"], reference or [])
            row["x_single"] = row["ms_per_token_median"] / single_ms
            if mode in cfg.modes:
                runs.append(row)
            bar.write(f"{mode:12s} loss {loss:<5g} {row['ms_per_token_median']:8.1f} ms/token (p95 "
                      f"{row['ms_per_token_p95']:.1f}, {row['x_single']:.2f}x single)  "
                      f"ppl {row['perplexity'] or float('nan'):.3f}  "
                      f"agreement {row['agreement']:.3f}  dropped {row['dropped_share']:.4f}")
    for r in runs:
        r.pop("generated")
    return {"model": model_name, "ranks": cfg.ranks, "net": cfg.net, "lossy_ranks": cfg.lossy_ranks,
            "rto_min_ms": cfg.rto_min_ms,
            "machine": machine_description(), "tokens": cfg.tokens, "warmup": cfg.warmup,
            "eval_tokens": cfg.eval_tokens, "single_ms_per_token_median": single_ms, "runs": runs}


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def write_results(results: dict, out: str, command: str):
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "results.json"), results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(results_markdown(results, command))
    plotted = plot_results(results, os.path.join(out, "results.png"))
    return plotted


def results_markdown(r: dict, command: str) -> str:
    rto = f", TCP rto_min {r['rto_min_ms']:g} ms" if r.get("rto_min_ms") is not None else ""
    lines = [f"# halo-mpi bench: {r['model']}, {r['ranks']} ranks, {r['net']} loss on ranks "
             f"{r['lossy_ranks']}{rto}", "", f"Command: `{command}`", "", f"Machine: {r['machine']}; all "
             f"ranks share these cores. {r['tokens']} timed decode tokens after {r['warmup']} warm-up; "
             f"perplexity teacher-forced over {r['eval_tokens']} held-out tokens.", "",
             "| mode | wire | loss | median ms/token | x single | p95 ms/token | mean ms/token "
             "| perplexity | agreement | dropped share | peak RSS MB per rank |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        ppl = f"{x['perplexity']:.3f}" if x["perplexity"] is not None else "(exact)"
        lines.append(f"| {x['mode']} | {x['wire']} | {x['loss']:g} | {x['ms_per_token_median']:.1f} "
                     f"| {x['x_single']:.2f} "
                     f"| {x['ms_per_token_p95']:.1f} "
                     f"| {x['ms_per_token_mean']:.1f} "
                     f"| {ppl} | {x['agreement']:.3f} | {x['dropped_share']:.4f} | "
                     f"{', '.join(f'{v:.0f}' for v in x['peak_rss_mb'])} |")
    by = {(x["mode"], x["loss"]): x for x in r["runs"]}
    speedups = [f"{l:g}: "
                f"{by[('strict', l)]['ms_per_token_median'] / by[('halo', l)]['ms_per_token_median']:.2f}x"
                for (m, l) in sorted(by) if m == "halo" and ("strict", l) in by]
    if speedups:
        lines += ["", "Speedup of halo over strict (median ms/token) at each loss rate: "
                  + ", ".join(speedups)]
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
