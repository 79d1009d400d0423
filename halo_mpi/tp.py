"""Tensor parallelism applied to the reference model from outside, and the run on every rank.

    mpiexec -n 4 halo-mpi generate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05 ...

Every rank opens the store itself (or its own shard: `--weights 'shards/m.rank{rank}.h5'`),
computes the same placement from the store's static importance, and loads only its own MLP
groups. Rank 0 builds the model with `DistributedMLP`s in place of the MLPs and runs the usual
generation loop; the others serve partial sums until rank 0 stops them.
"""
from __future__ import annotations

import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .comm import HEADER, LinkLoss, LocalHub, MPITransport, parse_link_loss
from .engine import Coordinator, DistributedMLP, SyncPolicy, TensorParallelSession, Worker
from .predictor import Predictor
from .scheduler import STABLE, ClusterSpec, Replanner, describe_plan, plan, random_placement
from .errors import HaloError
from .groups import GroupMLP
from .importance import uniform_importance
from .launch import collective
from .linear import DTYPES
from .model import Transformer
from .scheduler import Placement
from .store import Store


@dataclass
class TensorPlan:
    size: int
    importance: np.ndarray        # (n_layers, G) static shares, each row sums to 1
    placement: Placement
    loss: dict[int, float]        # rank -> emulated packet loss on its link with rank 0
    policy: SyncPolicy
    importance_source: str
    cluster: ClusterSpec
    placement_mode: str = "semantic"   # semantic | static | random
    sparsity: float = 0.0
    replan: bool = False
    group_mb: float = 0.0
    loss_model: str = "tcp"


def store_path(pattern: str, rank: int) -> str:
    return pattern.format(rank=rank) if "{rank}" in pattern else pattern


def parse_ranks(spec: str | None, size: int, option: str) -> set[int]:
    if not spec:
        return set()
    try:
        ranks = {int(x) for x in spec.split(",") if x.strip()}
    except ValueError:
        raise HaloError(f"{option} {spec!r} is not a comma list of ranks") from None
    bad = sorted(r for r in ranks if not 1 <= r < size)
    if bad:
        raise HaloError(f"{option} names ranks {bad}; the workers are ranks 1..{size - 1}")
    return ranks


def make_plan(store: Store, size: int, sync: str = "halo", link_loss: str | None = None,
              unstable_ranks: str | None = None, critical_share: float = 0.3,
              deadline_factor: float = 1.5, deadline_margin_ms: float = 2.0,
              placement: str = "semantic", device_profile: str | None = None,
              sparsity: float = 0.0, replan: bool = True, seed: int = 0,
              loss_model: str = "tcp", backup_share: float = 0.0) -> TensorPlan:
    """The same plan on every rank, from the store and the options alone."""
    if not 0.0 < critical_share <= 1.0:
        raise HaloError(f"--critical-share {critical_share} is not in (0, 1]")
    if not 0.0 <= sparsity < 1.0:
        raise HaloError(f"--sparsity {sparsity} is not in [0, 1)")
    if not 0.0 <= backup_share <= 1.0:
        raise HaloError(f"--backup-share {backup_share} is not in [0, 1]")
    a = store.args
    loss = parse_link_loss(link_loss, size)
    unstable = parse_ranks(unstable_ranks, size, "--unstable-ranks") if unstable_ranks else set(loss)
    if 0 in unstable:
        raise HaloError("rank 0 coordinates and cannot be unstable; list worker ranks only")
    cluster = (ClusterSpec.from_toml(device_profile, size, unstable) if device_profile
               else ClusterSpec.uniform(size, unstable))
    imp = store.calibration("static_importance")
    source = "static (calibration)"
    if imp is None:
        imp, source = uniform_importance(a.n_layers, a.mlp_groups), "uniform (no calibration in store)"
    elif imp.shape != (a.n_layers, a.mlp_groups):
        raise HaloError(f"{store.path}: calibration is for another group layout; run halo-mpi calibrate")
    group_mb = 3 * a.group_size * a.dim * 4 / 1e6
    if placement == "random":
        placed = random_placement(a.n_layers, a.mlp_groups, cluster, seed)
    elif placement in ("semantic", "static"):
        placed = plan(imp, cluster, group_mb)
    else:
        raise HaloError(f"--placement {placement!r}: choose semantic, static or random")
    policy = SyncPolicy(sync, critical_share, frozenset(r for r in range(1, size)
                                                        if cluster.ranks[r].reliability < STABLE),
                        deadline_factor, deadline_margin_ms / 1e3, backup_share=backup_share)
    return TensorPlan(size, imp, placed, loss, policy, source, cluster, placement, sparsity,
                      replan and sync == "halo" and placement != "random", group_mb, loss_model)


def group_loader(store: Store, dtype) -> Callable:
    """(layer, ids) -> GroupMLP of those groups, read from this rank's store."""
    return lambda layer, ids: GroupMLP(store.mlp_groups(layer, ids), ids, dtype)


def make_coordinator(store: Store, plan: TensorPlan, transport, dtype, log=None) -> tuple:
    """Rank 0: the coordinator and the reference model with DistributedMLPs in place of MLPs."""
    predictor = Predictor.from_store(store) if plan.placement_mode != "static" else None
    replanner = Replanner(plan.cluster, plan.importance, plan.group_mb) if plan.replan else None
    coordinator = Coordinator(transport, plan.placement, plan.importance, plan.policy,
                              group_loader(store, dtype), predictor, plan.sparsity, replanner, log)
    model = Transformer.from_store(store, dtype=dtype, mlp=lambda layer: DistributedMLP(coordinator, layer))
    return coordinator, model


def make_worker(store: Store, plan: TensorPlan, transport, dtype) -> Worker:
    rank, load = transport.rank, group_loader(store, dtype)
    mlps = {layer: load(layer, p[rank]) for layer, p in enumerate(plan.placement) if len(p[rank])}
    return Worker(transport, mlps, load, speed=plan.cluster.ranks[rank].speed, sparse=plan.sparsity > 0)


def max_message_bytes(store: Store, prefill_chunk: int) -> int:
    return max(HEADER.itemsize + prefill_chunk * store.args.dim * 4, 1 << 20)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time this process used: with waiting that never spins it stays near compute time."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


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


def run_tensor(comm, store: Store, plan: TensorPlan, drive, dtype=torch.float32, seed: int = 0,
               prefill_chunk: int = 64, loss: LinkLoss | None = None) -> TensorRun:
    """Every rank: workers serve partial sums; rank 0 runs drive(coordinator, model), then stops
    the workers. Ends with every transport closed and the per-rank figures gathered on rank 0."""
    rank = comm.Get_rank()
    if loss is None and plan.loss:
        loss = LinkLoss(plan.loss, seed=seed, model=plan.loss_model)
    transport = MPITransport(comm, max_message_bytes(store, prefill_chunk), loss)
    result = coordinator = None
    workers: dict = {}
    t0 = time.perf_counter()
    if rank == 0:
        coordinator, model = make_coordinator(store, plan, transport, dtype,
                                              log=lambda line: print(line, file=sys.stderr))
        result = drive(coordinator, model)
        workers = coordinator.finish()
    else:
        make_worker(store, plan, transport, dtype).run()
    wall = time.perf_counter() - t0
    pending = transport.close()
    gathered = comm.gather((pending, peak_rss_mb(), cpu_seconds()), root=0)
    if rank != 0:
        return TensorRun(None, None, {}, [], [], [], wall)
    pend, rss, cpu = (list(x) for x in zip(*gathered))
    return TensorRun(result, coordinator, workers, pend, rss, cpu, wall)


def open_and_plan(a, rank: int, size: int) -> tuple[Store, TensorPlan]:
    """This rank's store and the plan every rank computes alike, from the CLI options."""
    store = Store(store_path(a.weights, rank))
    plan = make_plan(store, size, a.sync, a.link_loss, a.unstable_ranks, a.critical_share,
                     a.deadline_factor, a.deadline_margin_ms, a.placement, a.device_profile,
                     a.sparsity, not a.no_replan, a.seed, a.loss_model, a.backup_share)
    return store, plan


def run_generate(a):
    from mpi4py import MPI

    from .cli import TokenPrinter, encode_prompt, read_prompts, stop_ids, write_stats
    from .generate import Sampler, generate
    from .runtime import configure_threads
    from .tokenizer import Tokenizer

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    configure_threads(a.threads)

    def setup():
        store, plan = open_and_plan(a, rank, size)
        prompts = encoded = tok = None
        if rank == 0:
            tok = Tokenizer.from_store(store)
            prompts = read_prompts(a)
            encoded = [encode_prompt(tok, p, a, store.args.max_seq_len) for p in prompts]
        return store, plan, tok, prompts, encoded

    store, plan, tok, prompts, encoded = collective(comm, setup)
    if rank == 0:
        print(f"tensor-parallel on {size} ranks, sync {plan.policy.mode}, placement "
              f"{plan.placement_mode}, importance {plan.importance_source}"
              f"{' + per-token predictor' if plan.placement_mode != 'static' and store.calibration('predictor_current_A') is not None else ''}"
              f", link loss {plan.loss or 'none'}, unstable ranks {sorted(plan.policy.unstable) or 'none'}"
              f"{f', sparsity {plan.sparsity:g}' if plan.sparsity else ''}\n"
              f"{describe_plan(plan.placement, plan.importance, plan.cluster)}", file=sys.stderr)

    def drive(coordinator, model):
        results = []
        for index, (prompt, (ids, max_new)) in enumerate(zip(prompts, encoded)):
            session = TensorParallelSession(model, coordinator, len(ids) + max_new, a.prefill_chunk)
            printer = TokenPrinter(tok, prompt if not a.chat else "", a.quiet,
                                   label=f"[{index}] " if len(prompts) > 1 else "")
            with torch.inference_mode():
                result = generate(session, ids, max_new, Sampler(a.temperature, a.top_p, a.seed),
                                  stop_ids(tok, a), printer)
            printer.close(result.tokens)
            results.append(result)
        return results

    run = run_tensor(comm, store, plan, drive, DTYPES[a.dtype], a.seed, a.prefill_chunk)
    store.close()
    if rank == 0:
        stats = tensor_stats(plan, run)
        print(format_report(stats), file=sys.stderr)
        if a.stats_json:
            write_stats(a.stats_json, stats)


def evaluate_tensor(a):
    """Teacher-forced perplexity through the engine: `halo-mpi evaluate --parallel tensor`."""
    from mpi4py import MPI

    from .cli import write_stats
    from .evaluate import perplexity, teacher_forced_nll
    from .runtime import configure_threads
    from .texts import evaluation_text, read_text
    from .tokenizer import Tokenizer

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    configure_threads(a.threads)

    def setup():
        store, plan = open_and_plan(a, rank, size)
        ids = None
        if rank == 0:
            text = read_text(a.text) if a.text else evaluation_text()
            ids = Tokenizer.from_store(store).encode(text)[: a.tokens + 1]
        return store, plan, ids

    store, plan, ids = collective(comm, setup)

    def drive(coordinator, model):
        with torch.inference_mode():
            return teacher_forced_nll(TensorParallelSession(model, coordinator, len(ids), a.prefill_chunk), ids)

    run = run_tensor(comm, store, plan, drive, DTYPES[a.dtype], a.seed, a.prefill_chunk)
    store.close()
    if rank == 0:
        recs = [r for r in run.coordinator.records if r.decoding]
        result = {"mode": "tensor", "sync": plan.policy.mode, "placement": plan.placement_mode,
                  "perplexity": perplexity(run.result), "tokens": len(run.result),
                  "dropped_share_mean": float(np.mean([r.dropped_share for r in recs])) if recs else 0.0,
                  "link_loss": {str(k): v for k, v in plan.loss.items()}}
        print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} held-out tokens "
              f"(tensor, {plan.policy.mode}, {plan.placement_mode}, loss {plan.loss or 'none'}); "
              f"dropped importance share {result['dropped_share_mean']:.4f}")
        if a.json:
            write_stats(a.json, result)


def tensor_stats(plan: TensorPlan, run: TensorRun) -> dict:
    coordinator, workers, results, pendings, rss, cpu = (run.coordinator, run.workers, run.result,
                                                         run.pending, run.rss_mb, run.cpu_s)
    decode_s = [s for r in results for s in r.decode_s]
    decode_records = [r for r in coordinator.records if r.decoding]
    dropped = [r.dropped_share for r in decode_records]
    t = coordinator.t.stats
    ranks = [{"rank": 0, "compute_s": coordinator.compute_s, "wait_s": coordinator.gather_wait_s,
              "on_time_rate": 1.0, "dropped_layers": 0, "late_discarded": 0,
              "groups": int(sum(len(p[0]) for p in plan.placement)), "peak_rss_mb": rss[0],
              "backup_groups": int(sum(len(m.ids) for b in coordinator.backup.values() for m in b.values())),
              "cpu_s": cpu[0],
              "held_by_loss": t.held, "pending_requests_at_end": pendings[0]}]
    for r in range(1, plan.size):
        w, link = workers.get(r, {}), coordinator.links[r]
        ranks.append({**w, "rank": r, "on_time_rate": link.on_time_rate,
                      "dropped_layers": sum(rec.dropped_ranks[r] for rec in decode_records),
                      "late_discarded": coordinator.late_discarded[r],
                      "recovered_by_backup": coordinator.recovered[r],
                      "deadline_ms": 1e3 * link.deadline(), "grace_ms": 1e3 * link.grace(),
                      "peak_rss_mb": rss[r], "cpu_s": cpu[r],
                      "pending_requests_at_end": pendings[r], "link_loss": plan.loss.get(r, 0.0)})
    return {
        "mode": "tensor", "sync": plan.policy.mode, "ranks_total": plan.size,
        "importance": plan.importance_source, "link_loss": {str(k): v for k, v in plan.loss.items()},
        "unstable_ranks": sorted(plan.policy.unstable), "critical_share": plan.policy.critical_share,
        "tokens": sum(len(r.tokens) for r in results),
        "ms_per_token_median": 1e3 * statistics.median(decode_s) if decode_s else float("nan"),
        "ms_per_token_p95": 1e3 * float(np.quantile(decode_s, 0.95)) if decode_s else float("nan"),
        "tokens_per_s": len(decode_s) / sum(decode_s) if decode_s else float("nan"),
        "prefill_s": sum(r.prefill_s for r in results), "wall_s": run.wall_s,
        "dropped_share_mean": float(np.mean(dropped)) if dropped else 0.0,
        "dropped_share_max": float(np.max(dropped)) if dropped else 0.0,
        "dropped_per_token": dropped,
        "decode_ms": [1e3 * s for s in decode_s],
        "pending_requests_at_end": int(sum(pendings)),
        "sequences": [{"index": i, "tokens": r.tokens, "stopped_by": r.stopped_by}
                      for i, r in enumerate(results)],
        "ranks": ranks,
    }


def format_report(s: dict) -> str:
    lines = [f"{s['tokens']} tokens: {s['ms_per_token_median']:.1f} ms/token median (p95 "
             f"{s['ms_per_token_p95']:.1f}), {s['tokens_per_s']:.1f} tokens/s; dropped importance "
             f"share per token: mean {s['dropped_share_mean']:.4f}, max {s['dropped_share_max']:.4f}; "
             f"requests pending at end: {s['pending_requests_at_end']}",
             "rank  groups  compute_s  wait_s  cpu_s  on-time  dropped-layers  recovered  late-discarded  skipped  peak-RSS-MB"]
    for r in s["ranks"]:
        lines.append(f"{r['rank']:4d}  {r.get('groups', 0):6d}  {r.get('compute_s', 0):9.2f}  "
                     f"{r.get('wait_s', 0):6.2f}  {r['cpu_s']:5.1f}  {r['on_time_rate']:7.3f}  {r['dropped_layers']:14d}  "
                     f"{r.get('recovered_by_backup', 0):9d}  {r['late_discarded']:14d}  {r.get('skipped', 0):7d}  {r['peak_rss_mb']:11.0f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the single-process twin: ranks as threads, for tests

class LocalCluster:
    """Rank 0 in the calling thread, workers in threads, connected by a LocalHub."""

    def __init__(self, store: Store, plan: TensorPlan, loss: LinkLoss | None = None, dtype=torch.float32):
        self.hub = LocalHub(plan.size, loss)
        self.coordinator, self.model = make_coordinator(store, plan, self.hub.transports[0], dtype)
        self.worker_stats: dict[int, dict] = {}
        self.threads = []
        for r in range(1, plan.size):
            worker = make_worker(store, plan, self.hub.transports[r], dtype)
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
