"""What a tensor-parallel run reports: its statistics (the schema of halo_mpi/stats.py) and the
table rank 0 prints at the end."""
from __future__ import annotations

from ..loading.parts import describe_loading
from ..net.wire import wire_report
from ..stats import RankStats, RunStats, SequenceStats
from .plan import TensorPlan
from .run import TensorRun


def tensor_stats(plan: TensorPlan, run: TensorRun, results: list) -> RunStats:
    """The run's statistics; `results`: the GenerationResult of each sequence."""
    c, o = run.coordinator, plan.options
    t = o.tensor
    decoding = [rec for rec in c.records if rec.decoding]
    backup = int(sum(len(m.ids) for b in c.backup.values() for m in b.values()))
    wait0 = c.gather_wait_s + (c.exchange.wait_s if c.exchange is not None else 0.0)
    ranks = [RankStats(0, run.rss_mb[0], run.cpu_s[0], c.compute_s, wait0, run.pending[0],
                       {"groups": int(sum(len(p[0]) for p in c.placement)), "backup_groups": backup,
                        "attention_groups": int(sum(len(c.held.heads(l)) for l in range(c.n_layers))),
                        "head_rows": c.vocab[0][1] - c.vocab[0][0],
                        "on_time_rate": 1.0, "dropped_layers": 0, "late_discarded": 0,
                        "held_by_loss": c.t.stats.held, "rss_mb_trace": c.rss.samples,
                        **({"loading": c.loading.stats()} if c.loading is not None else {})},
                       weight_bytes=c.weight_bytes + c.model_bytes)]
    for r in range(1, plan.size):
        w, link = dict(run.workers.get(r, {})), c.links[r]
        compute, wait = w.pop("compute_s", 0.0), w.pop("wait_s", 0.0)
        w.pop("rank", None)
        weight = w.pop("weight_bytes", 0)
        extra = {**w, "on_time_rate": link.on_time_rate,
                 "dropped_layers": sum(rec.dropped_ranks[r] for rec in decoding),
                 "late_discarded": c.late_discarded[r], "recovered_by_backup": c.recovered[r],
                 "deadline_ms": 1e3 * link.deadline(), "grace_ms": 1e3 * link.grace(),
                 "link_loss": plan.loss.get(r, 0.0)}
        ranks.append(RankStats(r, run.rss_mb[r], run.cpu_s[r], compute, wait, run.pending[r], extra, weight))
    decode_s = [s for res in results for s in res.decode_s]
    config = {"sync": plan.policy.mode, "all_reduce": plan.exchange, "placement": t.placement,
              "importance": plan.importance_source,
              "link_loss": {str(k): v for k, v in plan.loss.items()},
              "unstable_ranks": sorted(plan.policy.unstable), "critical_share": plan.policy.critical_share,
              "backup_share": t.backup_share, "sparsity": t.sparsity, "replans": list(c.replans),
              "unreachable": {str(r): step for r, step in c.unreachable.items()},
              "rank_timeout": o.rank_timeout,
              "wire": wire_report(plan.dim, plan.wire), "silent": list(c.silent)}
    return RunStats("tensor", plan.size, o.dtype, [SequenceStats.of(i, res) for i, res in enumerate(results)],
                    ranks, len(decode_s) / sum(decode_s) if decode_s else float("nan"), run.wall_s,
                    [rec.dropped_share for rec in decoding], config)


def format_report(stats: RunStats) -> str:
    s = stats.as_json()
    nan = float("nan")
    lines = [f"{s['tokens']} tokens: {s['ms_per_token_median'] or nan:.1f} ms/token median (p95 "
             f"{s['ms_per_token_p95'] or nan:.1f}, p99 {s['ms_per_token_p99'] or nan:.1f}, max "
             f"{s['ms_per_token_max'] or nan:.1f}; {s['slow_tokens']} over 3x the median), "
             f"{s['tokens_per_s'] or float('nan'):.1f} tokens/s; "
             f"dropped importance share per token: mean {s['dropped_share_mean']:.4f}, max "
             f"{s['dropped_share_max']:.4f}; requests pending at end: {s['pending_requests_at_end']}",
             "rank  groups  attn  head-rows  weights-MB  compute_s  wait_s  cpu_s  on-time  dropped-layers  "
             "recovered  late-discarded  skipped  peak-RSS-MB"]
    for r in s["ranks"]:
        lines.append(f"{r['rank']:4d}  {r.get('groups', 0):6d}  {r.get('attention_groups', 0):4d}  "
                     f"{r.get('head_rows', 0):9d}  {r['weight_bytes'] / 1e6:10.1f}  "
                     f"{r['compute_s']:9.2f}  {r['wait_s']:6.2f}  "
                     f"{r['cpu_s'] or nan:5.1f}  {r['on_time_rate']:7.3f}  {r['dropped_layers']:14d}  "
                     f"{r.get('recovered_by_backup', 0):9d}  {r['late_discarded']:14d}  "
                     f"{r.get('skipped', 0):7d}  {r['peak_rss_mb'] or nan:11.0f}"
                     + ("  (silent at the end: no statistics)" if r["rank"] in s["config"].get("silent", [])
                        else ""))
    tokens = s["tokens"]
    for r in s["ranks"]:
        if r.get("loading"):
            lines.append(f"rank {r['rank']} memory: {r['loading']['plan']}\n  "
                         f"{describe_loading(r['loading'], tokens)}")
    replans = s["config"]["replans"]
    lines.append(f"re-plans: {len(replans)}" + "".join(f"\n  {line}" for line in replans))
    return "\n".join(lines)
