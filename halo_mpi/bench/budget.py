"""Decode speed and memory under memory budgets, with and without prefetching: one `generate`
per configuration (one process, or `mpiexec -n R` in strict tensor mode), rounds interleaved so
that the machine's drift hits every configuration alike.

    halo-mpi bench --budgets 100%,50%:prefetch,50%:no-prefetch --budget-ranks 1,2 --repeat 3
    halo-mpi bench --budgets 100%,80%:prefetch,80%:no-prefetch --cold-reads

Each row: median ms/token (the median of the rounds' medians), its ratio to the 100% row of the
same ranks, the ratio of no-prefetch to prefetch at the same budget, bytes read per token, time
blocked on loads, hit rate, the largest rank's resident weights and peak RSS, and what the process
held before loading weights (the overhead beside the budget).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, replace

from ..errors import HaloError
from ..net.launch import mpiexec_path
from ..options.tree import ModeOptions
from ..options.values import Budget
from ..stats import RunStats
from .rank import Task, command, last_line

PROMPT = "The history of the printing press"


@dataclass
class BudgetBench:
    base: ModeOptions                   # --weights, --dtype, --threads, --read-mbps, --cold-reads
    budgets: list[str]                  # '50%', '150MB', '50%:no-prefetch'
    ranks: list[int]                    # 1: one process; R > 1: strict tensor mode on R ranks
    tokens: int = 48
    warmup: int = 8
    repeat: int = 3
    timeout: float = 900.0


PREFETCH = {"": "auto", "prefetch": "on", "no-prefetch": "off"}


def parse_budget_spec(spec: str) -> tuple[Budget, str]:
    """'50%' -> (50%, 'auto'); '50%:prefetch' -> (50%, 'on'); '50%:no-prefetch' -> (50%, 'off')."""
    budget, _, flag = spec.partition(":")
    if flag not in PREFETCH:
        raise HaloError(f"--budgets {spec!r}: write BUDGET, BUDGET:prefetch or BUDGET:no-prefetch")
    return Budget.parse(budget), PREFETCH[flag]


def run_options(cfg: BudgetBench, ranks: int, spec: str) -> ModeOptions:
    budget, prefetch = parse_budget_spec(spec)
    o = replace(cfg.base, load=replace(cfg.base.load, mem_budget=budget, prefetch=prefetch))
    if ranks > 1:
        o = replace(o, parallel="tensor", tensor=replace(o.tensor, sync="strict"))
    return o


def run_one(cfg: BudgetBench, ranks: int, spec: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "stats.json")
        cmd = command(run_options(cfg, ranks, spec), Task("generate", PROMPT, cfg.warmup + cfg.tokens + 1,
                                                         out=out))
        done = subprocess.run([mpiexec_path(), "-n", str(ranks), *cmd], capture_output=True, text=True,
                              timeout=cfg.timeout)
        if done.returncode != 0:
            raise HaloError(f"bench run ({ranks} ranks, budget {spec}) failed: {last_line(done.stderr)}")
        with open(out) as f:
            stats = RunStats.from_json(json.load(f))
    timed = stats.decode_ms[cfg.warmup:]
    loading = [r.extra.get("loading") or {} for r in stats.ranks]
    tokens = len(stats.decode_ms) + 1
    return {"ms": statistics.median(timed), "tokens": stats.sequences[0].tokens,
            "peak_rss_mb": max(r.peak_rss_mb for r in stats.ranks),
            "weights_mb": max(r.weight_bytes for r in stats.ranks) / 1e6,
            "budget_mb": max((s.get("budget_bytes", 0) for s in loading), default=0) / 1e6,
            "before_mb": max((s.get("rss_before_weights_mb", 0) for s in loading), default=0),
            "read_mb_per_token": max((s.get("bytes_read", 0) for s in loading), default=0) / 1e6 / tokens,
            "blocked_ms_per_token": max((s.get("blocked_s", 0) for s in loading), default=0) * 1e3 / tokens,
            "hit_rate": min((s["hit_rate"] for s in loading if "hit_rate" in s), default=float("nan"))}


def run_budget_bench(cfg: BudgetBench, log=print) -> list[dict]:
    runs: dict[tuple[int, str], list[dict]] = {}
    for round_ in range(cfg.repeat):
        for ranks in cfg.ranks:
            for spec in cfg.budgets:
                r = run_one(cfg, ranks, spec)
                runs.setdefault((ranks, spec), []).append(r)
                log(f"round {round_ + 1}/{cfg.repeat}: {ranks} rank(s), budget {spec}: "
                    f"{r['ms']:.1f} ms/token, peak RSS {r['peak_rss_mb']:.0f} MB")
    rows = []
    for (ranks, spec), rs in runs.items():
        row = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "tokens"}
        row.update(ranks=ranks, budget=spec, rounds=[r["ms"] for r in rs],
                   same_text_as_first_round=all(r["tokens"] == rs[0]["tokens"] for r in rs))
        rows.append(row)
    for row in rows:
        full = next((r for r in rows if r["ranks"] == row["ranks"] and r["budget"] == "100%"), None)
        row["vs_full"] = row["ms"] / full["ms"] if full else float("nan")
        budget, _, flag = row["budget"].partition(":")
        other = next((r for r in rows if r["ranks"] == row["ranks"]
                      and r["budget"] == f"{budget}:no-prefetch"), None) if flag != "no-prefetch" else None
        row["no_prefetch_vs_this"] = other["ms"] / row["ms"] if other else float("nan")
    return rows


def format_rows(rows: list[dict]) -> str:
    head = ("| ranks | budget | ms/token (median) | x of 100% | no-prefetch / this | MB read per token "
            "| blocked ms/token | hit rate | weights MB (max rank) | peak RSS MB (max rank) "
            "| RSS before weights MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['budget']} | {r['ms']:.1f} | {r['vs_full']:.2f} | "
                     f"{r['no_prefetch_vs_this']:.2f} | {r['read_mb_per_token']:.1f} | "
                     f"{r['blocked_ms_per_token']:.1f} | {r['hit_rate']:.2f} | {r['weights_mb']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['before_mb']:.0f} |")
    return "\n".join(lines)
