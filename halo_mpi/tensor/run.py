"""Tensor parallelism applied to the reference model from outside, and the run on every rank.

    mpiexec -n 4 halo-mpi generate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05 ...

Every rank opens the store itself (or its own shard: `--weights 'shards/m.rank{rank}.h5'`),
computes the same placement from the store's static importance and the options, and loads only
its own attention groups, MLP groups and head slice. Rank 0 builds the model with distributed
attention, MLPs and head in place of its own (and the embedding read row by row from the store)
and runs whatever `drive(coordinator, model)` asks (a generation loop, a perplexity); the others
serve partial sums until rank 0 stops them.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import HaloError
from ..loading.budget import parse_budget
from ..loading.embedding import StoreEmbedding
from ..loading.parts import BudgetedWeights, LoadOptions, describe_loading, rank_residency
from ..model.groups import GroupMLP
from ..model.linear import DTYPES
from ..model.llama import Attention, Transformer
from ..net.devices import STABLE, ClusterSpec, read_device_profile
from ..net.framing import HEADER
from ..net.local import LocalHub
from ..net.loss import LinkLoss
from ..net.ranks import parse_rank_values, parse_ranks
from ..net.transport import MPITransport, WaitPolicy
from ..net.wire import WIRE_DTYPES, wire_report
from ..stats import RankStats, RunStats, SequenceStats, cpu_seconds, peak_rss_mb
from ..store.hdf5 import Store
from .attention import HeldAttention
from .coordinator import (
    Coordinator,
    DistributedAttention,
    DistributedHead,
    DistributedMLP,
    TensorParallelSession,
)
from .exchange import ComputeClock, Exchange, ExchangeAttention, ExchangeMLP, Follower
from .head import VocabSlice
from .importance import uniform_importance
from .placement import (
    Placement,
    Replanner,
    attention_placement,
    describe_plan,
    held_by,
    holders,
    plan,
    probe_ranks,
    random_placement,
    vocab_slices,
)
from .policy import SyncPolicy
from .predictor import Predictor
from .worker import Worker

PLACEMENTS = ("semantic", "static", "random")


@dataclass
class TensorOptions:
    """Everything a tensor-parallel run is configured by; the CLI fills it from its options."""
    sync: str = "halo"                   # strict | halo
    link_loss: str | None = None         # 'RANK:P,...': emulated loss on links with rank 0
    loss_model: str = "tcp"              # tcp | rto (net/loss.py)
    unstable_ranks: str | None = None    # 'R,...' (default: the ranks in link_loss)
    critical_share: float = 0.3          # halo: importance waited for without deadline
    deadline_factor: float = 1.5         # halo: grace = factor * p90 lag + margin
    deadline_margin_ms: float = 2.0
    backup_share: float = 0.0            # halo: rank 0's backup of each unstable rank's groups
    drop_budget: float = 0.01            # halo: importance share a layer may expect to lose
    placement: str = "semantic"          # semantic | static | random
    device_profile: str | None = None    # TOML (net/devices.py)
    sparsity: float = 0.0                # share of predicted least important groups skipped
    no_replan: bool = False
    seed: int = 0                        # seeds the loss emulation and random placement
    dtype: str = "float32"               # compute dtype of the weights
    prefill_chunk: int = 64              # prompt tokens per message
    wire_dtype: str = "auto"             # precision of hidden states and partials on the wire
    spin_us: float | None = None         # busy-wait before napping (None: net.transport's default)
    rank_timeout: float = 60.0           # seconds of silence after which a rank is unreachable
    load: LoadOptions = field(default_factory=LoadOptions)   # --mem-budget and its loading


@dataclass
class TensorPlan:
    size: int
    importance: np.ndarray        # (n_layers, G) static shares, each row sums to 1
    placement: Placement
    loss: dict[int, float]        # rank -> emulated packet loss on its link with rank 0
    policy: SyncPolicy
    importance_source: str
    cluster: ClusterSpec
    options: TensorOptions
    replan: bool = False
    group_mb: float = 0.0
    dim: int = 0                  # width of the hidden states on the wire
    wire: str = "float32"         # their precision there (the options' auto resolved)
    attention: Placement | None = None             # [layer][rank] -> KV heads (attention groups)
    vocab: list[tuple[int, int]] | None = None     # rank -> [start, stop) rows of the output head
    exchange: bool = False        # strict sync run as an all-reduce among the ranks (tensor/exchange.py)


def store_path(pattern: str, rank: int) -> str:
    return pattern.format(rank=rank) if "{rank}" in pattern else pattern


def check_options(o: TensorOptions):
    if o.sync not in ("strict", "halo"):
        raise HaloError(f"--sync {o.sync!r}: choose strict or halo")
    if o.placement not in PLACEMENTS:
        raise HaloError(f"--placement {o.placement!r}: choose {', '.join(PLACEMENTS)}")
    if not 0.0 < o.critical_share <= 1.0:
        raise HaloError(f"--critical-share {o.critical_share} is not in (0, 1]")
    if not 0.0 <= o.sparsity < 1.0:
        raise HaloError(f"--sparsity {o.sparsity} is not in [0, 1)")
    if not 0.0 <= o.backup_share <= 1.0:
        raise HaloError(f"--backup-share {o.backup_share} is not in [0, 1]")
    if not 0.0 < o.drop_budget <= 1.0:
        raise HaloError(f"--drop-budget {o.drop_budget} is not in (0, 1]")
    if o.wire_dtype not in WIRE_DTYPES + ("auto",):
        raise HaloError(f"--wire-dtype {o.wire_dtype!r}: choose auto, {', '.join(WIRE_DTYPES)}")
    if o.spin_us is not None and o.spin_us < 0:
        raise HaloError(f"--spin-us {o.spin_us:g} is negative")
    if o.load.mem_budget:
        parse_budget(o.load.mem_budget)
        if o.backup_share > 0:
            raise HaloError("--backup-share keeps copies of other ranks' groups outside the memory "
                            "budget: not with --mem-budget")


def wire_dtype(o: TensorOptions) -> str:
    """auto: float32 for strict sync (the exact baseline), float16 for HALO: a 576-wide message
    fits one TCP segment, so a lost packet costs a ~10 ms probe instead of a ~200 ms timeout,
    and held-out perplexity moves by 0.005% (README, "Wire precision")."""
    if o.wire_dtype != "auto":
        return o.wire_dtype
    return "float32" if o.sync == "strict" else "float16"


def open_and_plan(weights: str, rank: int, size: int, o: TensorOptions) -> tuple[Store, TensorPlan]:
    """This rank's store (its shard with {rank} in the name) and the plan every rank computes alike."""
    store = Store(store_path(weights, rank))
    return store, make_plan(store, size, o)


def drop_budget(o: TensorOptions) -> float | None:
    """The placement's importance cap on unstable ranks: HALO sync only (strict loses nothing)."""
    return o.drop_budget if o.sync == "halo" else None


def make_plan(store: Store, size: int, o: TensorOptions) -> TensorPlan:
    """The same plan on every rank, from the store and the options alone."""
    check_options(o)
    a, workers = store.args, range(1, size)
    loss = parse_rank_values(o.link_loss, "--link-loss", workers, values=(0.0, 1.0))
    unstable = parse_ranks(o.unstable_ranks, "--unstable-ranks", workers) if o.unstable_ranks else set(loss)
    cluster = read_device_profile(o.device_profile, size, unstable)
    imp = store.calibration("static_importance")
    source = "static (calibration)"
    if imp is None:
        imp, source = uniform_importance(a.n_layers, a.mlp_groups), "uniform (no calibration in store)"
    elif imp.shape != (a.n_layers, a.mlp_groups):
        raise HaloError(f"{store.path}: calibration is for another group layout; run halo-mpi calibrate")
    group_mb = store.item_bytes("mlp") / 1e6                     # as stored: float32, bf16 or q4..
    eligible = holders(cluster, o.sync)
    attention = attention_placement(cluster, a.n_layers, a.n_kv_heads, eligible)
    vocab = vocab_slices(cluster, a.vocab_size, eligible)
    attn_b, row_b = store.item_bytes("attn"), store.item_bytes("head")
    reserved = [(sum(len(p[r]) for p in attention) * attn_b + (vocab[r][1] - vocab[r][0]) * row_b) / 1e6
                for r in range(size)]                               # MB of attention and head per rank
    if o.placement == "random":
        placed = random_placement(a.n_layers, a.mlp_groups, cluster, o.seed)
    else:
        placed = plan(imp, cluster, group_mb, drop_budget=drop_budget(o), reserved_mb=reserved)
    policy = SyncPolicy(o.sync, o.critical_share,
                        frozenset(r for r in workers if cluster.ranks[r].reliability < STABLE),
                        o.deadline_factor, o.deadline_margin_ms / 1e3, backup_share=o.backup_share)
    # a re-plan would move groups outside the loader's plan of streamed parts: not under a budget
    replan = not o.no_replan and o.sync == "halo" and o.placement != "random" and not o.load.mem_budget
    # strict sync with exact partials and no per-token skipping needs no decision of rank 0's:
    # every rank can run the model and all-reduce the partials (one message latency per round)
    exchange = o.sync == "strict" and o.sparsity == 0 and wire_dtype(o) == "float32"
    return TensorPlan(size, imp, placed, loss, policy, source, cluster, o, replan, group_mb, a.dim,
                      wire_dtype(o), attention, vocab, exchange)


def describe_wire(dim: int, wire: str) -> str:
    w = wire_report(dim, wire)
    return (f"wire {wire} ({w['message_bytes']} B per token and layer, {w['segments']} TCP "
            f"segment{'s' if w['segments'] > 1 else ''})")


def describe(plan: TensorPlan, store: Store) -> str:
    """What rank 0 prints before the run: mode, importance, loss, and the placement."""
    o = plan.options
    predictor = (o.placement != "static" and (o.sync == "halo" or o.sparsity > 0)
                 and store.calibration("predictor_current_A") is not None)
    sync = plan.policy.mode + (" (all-reduce)" if plan.exchange else "")
    return (f"tensor-parallel on {plan.size} ranks, sync {sync}, placement {o.placement}, "
            f"importance {plan.importance_source}{' + per-token predictor' if predictor else ''}, "
            f"link loss {plan.loss or 'none'}, unstable ranks {sorted(plan.policy.unstable) or 'none'}"
            f"{f', sparsity {o.sparsity:g}' if o.sparsity else ''}, {describe_wire(plan.dim, plan.wire)}\n"
            f"{describe_plan(plan.placement, plan.importance, plan.cluster)}")


def group_loader(store: Store, dtype) -> Callable:
    """(layer, ids) -> GroupMLP of those groups, read from this rank's store."""
    return lambda layer, ids: GroupMLP(store.mlp_groups(layer, ids), ids, dtype)


def rank_weights(store: Store, plan: TensorPlan, rank: int) -> BudgetedWeights | None:
    """Under --mem-budget: what this rank keeps resident and streams (loading/), else None."""
    o = plan.options
    if not o.load.mem_budget:
        return None
    start, stop = plan.vocab[rank]
    residency = rank_residency(store.args, store.store_dtype, o.dtype,
                               {l: len(p[rank]) for l, p in enumerate(plan.attention)},
                               {l: len(p[rank]) for l, p in enumerate(plan.placement)}, stop - start,
                               rank == 0, o.load, f"rank {rank}")
    return BudgetedWeights(store, residency, o.load, plan.importance, o.dtype,
                           skippable=plan.policy.mode == "halo")


def held_attention(store: Store, plan: TensorPlan, rank: int,
                   weights: BudgetedWeights | None = None) -> HeldAttention:
    """This rank's attention groups (KV heads) of every layer, read from its store, caches empty."""
    dtype = DTYPES[plan.options.dtype]
    held = HeldAttention(store.args, weights.attention if weights else
                         lambda layer, ids: Attention(store.args, store.attn_groups(layer, ids), ids, dtype))
    for layer, p in enumerate(plan.attention):
        held.regroup(layer, p[rank])
    return held


def head_loader(store: Store, dtype) -> Callable:
    """(start, stop) -> that vocabulary slice of the output head, read from this rank's store."""
    return lambda start, stop: VocabSlice(store, start, stop, dtype)


def make_coordinator(store: Store, plan: TensorPlan, transport, log=None) -> tuple:
    """Rank 0: the coordinator and the reference model with distributed attention, MLPs and head
    in place of its own, the embedding read row by row from the store."""
    o, dtype = plan.options, DTYPES[plan.options.dtype]
    predictor = Predictor.from_store(store) if o.placement != "static" else None
    replanner = (Replanner(plan.cluster, plan.importance, plan.group_mb, drop_budget(o))
                 if plan.replan else None)
    weights = rank_weights(store, plan, 0)
    # probes back up a rank's groups on rank 0: copies outside a memory budget
    probes = (probe_ranks(plan.cluster, plan.importance, drop_budget(o))
              if o.placement != "random" and weights is None else set())
    exchange = Exchange(transport, plan.attention, plan.placement) if plan.exchange else None
    coordinator = Coordinator(transport, plan.placement, plan.importance, plan.policy,
                              weights.mlp if weights else group_loader(store, dtype), predictor,
                              o.sparsity, replanner, log, probes=frozenset(probes),
                              attention=plan.attention, held=held_attention(store, plan, 0, weights),
                              vocab=plan.vocab, load_head=head_loader(store, dtype), exchange=exchange,
                              loading=weights, load_copies=group_loader(store, dtype))
    model = Transformer.from_store(store, embedding=False, head=False, dtype=dtype,
                                   mlp=lambda layer: DistributedMLP(coordinator, layer),
                                   attention=lambda layer: DistributedAttention(coordinator, layer))
    model.norm = torch.from_numpy(store.final_norm())                   # (dim,)
    model.output = DistributedHead(coordinator)
    model.lookup = StoreEmbedding(store)
    coordinator.model_bytes = model.weight_bytes()
    if weights is not None:
        weights.start()
    return coordinator, model


def make_worker(store: Store, plan: TensorPlan, transport) -> Worker | Follower:
    rank, dtype = transport.rank, DTYPES[plan.options.dtype]
    weights = rank_weights(store, plan, rank)
    load = weights.mlp if weights else group_loader(store, dtype)
    mlps = {layer: load(layer, p[rank]) for layer, p in enumerate(plan.placement) if len(p[rank])}
    start, stop = plan.vocab[rank]
    load_head = head_loader(store, dtype)
    head = load_head(start, stop) if stop > start else None
    if plan.exchange:
        worker = make_follower(store, plan, transport, mlps, head, weights)
    else:
        worker = Worker(transport, mlps, None if weights else load, speed=plan.cluster.ranks[rank].speed,
                        sparse=plan.options.sparsity > 0, held=held_attention(store, plan, rank, weights),
                        head=head, load_head=load_head, loading=weights)
    if weights is not None:
        weights.start()
    return worker


def make_follower(store: Store, plan: TensorPlan, transport, mlps: dict, head,
                  weights: BudgetedWeights | None = None) -> Follower:
    """A worker of the all-reduce: the model with its own groups' parts, the embedding read from
    the store and its head slice as the output."""
    exchange = Exchange(transport, plan.attention, plan.placement)
    clock = ComputeClock(plan.cluster.ranks[transport.rank].speed)
    held = held_attention(store, plan, transport.rank, weights)
    model = Transformer.from_store(store, embedding=False, head=False, dtype=DTYPES[plan.options.dtype],
                                   mlp=lambda layer: ExchangeMLP(exchange, mlps, layer, clock),
                                   attention=lambda layer: ExchangeAttention(exchange, held, layer, clock))
    model.norm = torch.from_numpy(store.final_norm())                   # (dim,)
    model.output, model.lookup = head, StoreEmbedding(store)
    return Follower(transport, exchange, model, held, mlps, clock, weights)


def wait_policy(o: TensorOptions) -> WaitPolicy:
    return WaitPolicy.default(None if o.spin_us is None else o.spin_us / 1e6)


def max_message_bytes(store: Store, prefill_chunk: int) -> int:
    """A prefill chunk's hidden states, or one row of logits of the whole vocabulary, 1 MB at least."""
    a = store.args
    return HEADER.itemsize + max(prefill_chunk * a.dim * 4, a.vocab_size * 4, 1 << 20)


def emulated_loss(plan: TensorPlan) -> LinkLoss | None:
    o = plan.options
    return LinkLoss(plan.loss, seed=o.seed, model=o.loss_model) if plan.loss else None


# ---------------------------------------------------------------------------------------------
# under MPI

@dataclass
class TensorRun:
    result: object            # what drive() returned (rank 0 only)
    coordinator: Coordinator | None
    workers: dict             # rank -> the worker's statistics (rank 0 only)
    pending: list[int]        # requests left pending after closing, per rank (rank 0 only)
    rss_mb: list[float]
    cpu_s: list[float]
    wall_s: float


def run_tensor(comm, store: Store, plan: TensorPlan, drive, log=None) -> TensorRun:
    """Every rank: workers serve partial sums; rank 0 runs drive(coordinator, model), then stops
    the workers. Ends with every transport closed and the per-rank figures gathered on rank 0."""
    rank = comm.Get_rank()
    o = plan.options
    transport = MPITransport(comm, max_message_bytes(store, o.prefill_chunk), emulated_loss(plan),
                             peers=range(plan.size) if plan.exchange else None,   # all-reduce: all pairs
                             wire=plan.wire, wait=wait_policy(o))
    watch_ranks(transport, plan)
    result = coordinator = None
    workers: dict = {}
    t0 = time.perf_counter()
    if rank == 0:
        coordinator, model = make_coordinator(store, plan, transport, log)
        result = drive(coordinator, model)
        workers = coordinator.finish()
    else:
        make_worker(store, plan, transport).run()
    wall = time.perf_counter() - t0
    pending = transport.close()
    if rank == 0 and coordinator.silent:   # a collective would wait for them forever: the caller
        nan = float("nan")                  # reports this rank's figures and ends the job
        return TensorRun(result, coordinator, workers, [pending] + [0] * (plan.size - 1),
                         [peak_rss_mb()] + [nan] * (plan.size - 1), [cpu_seconds()] + [nan] * (plan.size - 1),
                         wall)
    gathered = comm.gather((pending, peak_rss_mb(), cpu_seconds()), root=0)
    if rank != 0:
        return TensorRun(None, None, {}, [], [], [], wall)
    pend, rss, cpu = (list(x) for x in zip(*gathered))
    return TensorRun(result, coordinator, workers, pend, rss, cpu, wall)


class RankLost(HaloError):
    """The run finished without a rank (frozen or gone): it cannot be finalized."""
    exit_code = 3       # as RankSilent: the run lost a rank


def watch_ranks(transport, plan: TensorPlan):
    """Heartbeats and the ranks whose silence ends the run (net/transport.py, liveness): every
    worker in strict sync; in HALO sync the holders of attention groups or head rows (their K/V
    caches cannot be rebuilt elsewhere); rank 0 for a worker."""
    if plan.policy.mode == "strict":
        fatal, note = set(range(1, plan.size)), ": strict sync cannot go on without it"
    else:
        fatal = held_by(plan.attention, plan.vocab, plan.size) if plan.attention else set()
        note = (": it holds attention groups with their K/V cache or head rows, which HALO sync "
                "cannot rebuild elsewhere")
    transport.watch(plan.options.rank_timeout, fatal, note)


def end_if_silent(run: TensorRun):
    """After the report: workers that never answered STOP end the job with one line."""
    if run.coordinator is not None and run.coordinator.silent:
        raise RankLost(f"rank{'s' if len(run.coordinator.silent) > 1 else ''} "
                        f"{', '.join(map(str, run.coordinator.silent))} did not answer at the end "
                        f"(frozen or gone): its statistics are missing; ending the job")


def tensor_stats(plan: TensorPlan, run: TensorRun, results: list) -> RunStats:
    """The run's statistics; `results`: the GenerationResult of each sequence."""
    c, o = run.coordinator, plan.options
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
    config = {"sync": plan.policy.mode, "all_reduce": plan.exchange, "placement": o.placement,
              "importance": plan.importance_source,
              "link_loss": {str(k): v for k, v in plan.loss.items()},
              "unstable_ranks": sorted(plan.policy.unstable), "critical_share": plan.policy.critical_share,
              "backup_share": o.backup_share, "sparsity": o.sparsity, "replans": list(c.replans),
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


# ---------------------------------------------------------------------------------------------
# the single-process twin: ranks as threads, for tests

class LocalCluster:
    """Rank 0 in the calling thread, workers in threads, connected by a LocalHub."""

    def __init__(self, store: Store, plan: TensorPlan, loss: LinkLoss | None = None):
        self.hub = LocalHub(plan.size, loss, plan.wire)
        self.coordinator, self.model = make_coordinator(store, plan, self.hub.transports[0])
        self.worker_stats: dict[int, dict] = {}
        self.threads = []
        for r in range(1, plan.size):
            worker = make_worker(store, plan, self.hub.transports[r])
            th = threading.Thread(target=lambda w=worker, r=r: self.worker_stats.__setitem__(r, w.run()),
                                  daemon=True)
            th.start()
            self.threads.append(th)

    def session(self, max_len: int, prefill_chunk: int = 64) -> TensorParallelSession:
        return TensorParallelSession(self.model, self.coordinator, max_len, prefill_chunk)

    def stop(self) -> dict[int, dict]:
        done = self.coordinator.finish(timeout=30)
        for th in self.threads:
            th.join(timeout=30)
        return done
