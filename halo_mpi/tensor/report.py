"""What a tensor-parallel run reports: its statistics (the schema of halo_mpi/stats.py) and the
table rank 0 prints at the end."""
from __future__ import annotations

from ..loading.parts import describe_loading
from ..net.wire import wire_report
from ..stats import RankStats, RunStats, SequenceStats
from .held import loading_stats
from .plan import TensorPlan
from .run import TensorRun


def tensor_stats(plan: TensorPlan, run: TensorRun, results: list) -> RunStats:
    """The run's statistics; `results`: the GenerationResult of each sequence."""
    lead, o = run.lead, plan.options
    sats = lead.satellites
    decoding = [rec for rec in sats.records if rec.decoding]
    ranks = [lead_stats(run, lead)]
    for r in range(1, plan.size):
        w = dict(run.workers.get(r, {}))
        compute, wait = w.pop("compute_s", 0.0), w.pop("wait_s", 0.0)
        w.pop("rank", None)
        weight = w.pop("weight_bytes", 0)
        extra = {**w, "dropped_layers": sum(rec.dropped_ranks[r] for rec in decoding),
                 "late_discarded": sats.late_discarded[r], "unsent": sats.unsent[r],
                 "link_loss": plan.loss.get(r, 0.0),
                 **link_stats(sats, r)}
        ranks.append(RankStats(r, run.rss_mb[r], run.cpu_s[r], compute, wait, run.pending[r], extra, weight))
    decode_s = [s for res in results for s in res.decode_s]
    return RunStats("tensor", plan.size, o.dtype, [SequenceStats.of(i, res) for i, res in enumerate(results)],
                    ranks, len(decode_s) / sum(decode_s) if decode_s else float("nan"), run.wall_s,
                    [rec.dropped_share for rec in decoding], run_config(plan, lead))


def lead_stats(run: TensorRun, lead) -> RankStats:
    """Rank 0's figures: its own groups, its copies of satellites' groups, its rounds."""
    sats, ex = lead.satellites, lead.exchange
    return RankStats(0, run.rss_mb[0], run.cpu_s[0], lead.clock.seconds + sats.compute_s,
                     sats.wait_s + ex.wait_s, run.pending[0],
                     {"role": "lead", "groups": lead.groups.count,
                      "backup_groups": int(sum(len(m.ids) for m in lead.planner.backups.mlps.values())),
                      "attention_groups": lead.attention_groups.count,
                      "head_rows": lead.vocab[0][1] - lead.vocab[0][0], "rounds": ex.rounds,
                      "round_us": 1e6 * ex.wait_s / ex.rounds if ex.rounds else 0.0,
                      "satellite_wait_s": sats.wait_s, "plan_read_s": lead.planner.read_s,
                      "on_time_rate": 1.0, "dropped_layers": 0, "late_discarded": 0,
                      "held_by_loss": lead.t.stats.held, "rss_mb_trace": lead.rss.samples,
                      **loading_stats(lead.loading, lead.groups)},
                     weight_bytes=lead.weight_bytes + lead.model_bytes)


def link_stats(sats, r: int) -> dict:
    """A satellite's link as rank 0 saw it (members' links: their on-time rate is 1)."""
    link = sats.links.get(r)
    if link is None:
        return {"on_time_rate": 1.0}
    return {"on_time_rate": link.on_time_rate, "recovered_by_backup": sats.recovered[r],
            "deadline_ms": 1e3 * link.deadline(), "grace_ms": 1e3 * link.grace()}


def run_config(plan: TensorPlan, lead) -> dict:
    t, planner = plan.options.tensor, lead.planner
    return {"sync": plan.policy.mode, "members": plan.members, "satellites": plan.satellites,
            "placement": t.placement, "importance": plan.importance_source,
            "link_loss": {str(k): v for k, v in plan.loss.items()},
            "unstable_ranks": sorted(plan.policy.unstable), "critical_share": plan.policy.critical_share,
            "backup_share": plan.policy.backup_share, "sparsity": t.sparsity,
            "replans": list(planner.replans),
            "decode_steps": [rec.step for rec in lead.satellites.records if rec.decoding],
            "plan_switches": plan_switches(planner.switches),
            "unreachable": {str(r): step for r, step in planner.unreachable.items()},
            "rank_timeout": plan.options.rank_timeout,
            "wire": wire_report(plan.dim, plan.wire),
            "members_wire": wire_report(plan.dim, plan.members_wire),
            "silent": list(lead.silent), "unanswered": list(lead.unanswered),
            "links_measured": plan.measured}


def end_note(rank: int, config: dict) -> str:
    """Why a rank's row has no figures of its own: silent at the end, or its statistics stuck on
    a late link (a satellite, alive)."""
    if rank in config.get("silent", []):
        return "  (silent at the end: no statistics)"
    if rank in config.get("unanswered", []):
        return "  (its statistics did not come through its late link in time)"
    return ""


def plan_switches(switches) -> list[dict]:
    """Each plan put in force: its step and each rank's share of the MLP groups under it."""
    out = []
    for step, placement in switches:
        held = [sum(len(layer[r]) for layer in placement) for r in range(len(placement[0]))]
        out.append({"step": step, "mlp_share": {str(r): n / max(sum(held), 1) for r, n in enumerate(held)}})
    return out


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
                     + end_note(r["rank"], s["config"]))
    tokens = s["tokens"]
    for r in s["ranks"]:
        if r.get("loading"):
            lines.append(f"rank {r['rank']} memory: {r['loading']['plan']}\n  "
                         f"{describe_loading(r['loading'], tokens)}")
    replans = s["config"]["replans"]
    lines.append(f"re-plans: {len(replans)}" + "".join(f"\n  {line}" for line in replans))
    return "\n".join(lines)
