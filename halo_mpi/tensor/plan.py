"""The plan of a tensor-parallel run: the same on every rank, from the store and the options alone.

    plan = make_plan(store, size, options)      # roles; placement of attention, MLP groups, head

Every rank opens the store itself (or its own shard) and computes the plan; nothing is sent.
Roles: rank 0 and the ranks on stable links are the members: they hold the residual stream,
the attention groups and the head slices, and all-reduce their partials (exchange.py); the ranks
named unstable (--unstable-ranks, --link-loss) are satellites in HALO sync: the least important
MLP groups, gathered by rank 0 under deadlines (satellites.py). Strict sync has no satellites.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import HaloError
from ..loading.budget import mlp_bytes, weight_kinds
from ..net.devices import STABLE, ClusterSpec, read_device_profile
from ..net.framing import HEADER
from ..net.loss import LinkLoss
from ..net.probe import LinkSurvey, measure_links
from ..net.transport import WaitPolicy
from ..net.wire import HEADER_BYTES, body_nbytes, segments, wire_report
from ..options.tree import ModeOptions, check_tensor
from ..store.hdf5 import Store
from .importance import uniform_importance
from .placement import (
    Placement,
    attention_placement,
    describe_plan,
    holders,
    plan,
    random_placement,
    share_in_room,
    vocab_slices,
)
from .policy import SyncPolicy
from .reserve import reserve_bytes


@dataclass
class TensorPlan:
    size: int
    importance: np.ndarray        # (n_layers, G) static shares, each row sums to 1
    placement: Placement          # [layer][rank] -> MLP group ids
    loss: dict[int, float]        # rank -> emulated packet loss on its link with rank 0
    policy: SyncPolicy
    importance_source: str
    cluster: ClusterSpec
    options: ModeOptions
    replan: bool = False
    group_mb: float = 0.0
    dim: int = 0                  # width of the hidden states on the wire
    wire: str = "float32"         # the satellites' messages' precision (--wire-dtype auto resolved)
    members_wire: str = "float32"  # the members' all-reduce's (float32 unless asked otherwise)
    attention: Placement | None = None             # [layer][rank] -> KV heads (attention groups)
    vocab: list[tuple[int, int]] | None = None     # rank -> [start, stop) rows of the output head
    members: list[int] | None = None               # the stable ranks: they all-reduce (exchange.py)
    satellites: list[int] | None = None            # the unstable ranks: MLP groups only (satellite.py)
    reserve: list[int] | None = None               # rank -> bytes its --mem-budget keeps for re-plans
    measured: str = ""                             # what the start-up link probe found (net/probe.py)

    @property
    def budgeted(self) -> bool:
        return self.options.load.mem_budget is not None

    @property
    def drop_budget(self) -> float | None:
        """The placement's importance cap on unstable ranks: HALO sync only (strict loses nothing)."""
        return self.options.tensor.drop_budget if self.policy.mode == "halo" else None


def static_or_uniform(store: Store) -> tuple[np.ndarray, str]:
    """(n_layers, G) importance shares and where they come from."""
    a = store.args
    imp = store.calibration("static_importance")
    if imp is None:
        return uniform_importance(a.n_layers, a.mlp_groups), "uniform (no calibration in store)"
    if imp.shape != (a.n_layers, a.mlp_groups):
        raise HaloError(f"{store.path}: calibration is for another group layout; run halo-mpi calibrate")
    return imp, "static (calibration)"


def make_plan(store: Store, size: int, o: ModeOptions, survey: LinkSurvey | None = None) -> TensorPlan:
    """The same plan on every rank, from the store, the options and the links measured at start
    (`survey`, the same on every rank: net/probe.py): a rank behind a bad link starts unstable,
    with its measured on-time rate as its reliability (never above what the profile says)."""
    check_tensor(o, size)
    t, a, workers = o.tensor, store.args, range(1, size)
    cluster = read_device_profile(o.device_profile, size, t.unstable)
    for r, rate in (survey.unstable() if survey is not None else {}).items():
        cluster.ranks[r].reliability = min(cluster.ranks[r].reliability, rate)
    imp, source = static_or_uniform(store)
    group_mb = store.item_bytes("mlp") / 1e6                     # as stored: float32, bf16 or q4..
    eligible = holders(cluster, t.sync)
    attention = attention_placement(cluster, a.n_layers, a.n_kv_heads, eligible)
    vocab = vocab_slices(cluster, a.vocab_size, eligible)
    attn_b, row_b = store.item_bytes("attn"), store.item_bytes("head")
    reserved = [(sum(len(p[r]) for p in attention) * attn_b + (vocab[r][1] - vocab[r][0]) * row_b) / 1e6
                for r in range(size)]                               # MB of attention and head per rank
    halo = t.sync == "halo"
    if t.placement == "random":
        placed = random_placement(a.n_layers, a.mlp_groups, cluster, o.seed)
    else:
        placed = plan(imp, cluster, group_mb, drop_budget=t.drop_budget if halo else None,
                      reserved_mb=reserved)
    unstable = frozenset(r for r in workers if cluster.ranks[r].reliability < STABLE)
    backup = t.backup_share if t.backup_share is not None else auto_backup(
        cluster, placed, unstable, group_mb, reserved[0], o.load.mem_budget is not None)
    policy = SyncPolicy(t.sync, t.critical_share, unstable, t.deadline_factor, t.deadline_margin_ms / 1e3,
                        backup_share=backup)
    replan = not t.no_replan and halo and t.placement != "random"
    # the ranks that may hold attention and head rows all-reduce; the others are satellites
    members = sorted(eligible)
    satellites = [r for r in range(size) if r not in members]
    reserve = None
    if replan and o.load.mem_budget is not None:       # room for the groups re-plans move (reserve.py)
        reserve = reserve_bytes(imp, cluster, placed, group_mb, t.drop_budget, satellites,
                                group_bytes(store, o.dtype))
    return TensorPlan(size, imp, placed, dict(t.link_loss), policy, source, cluster, o, replan, group_mb,
                      a.dim, t.wire, t.members_wire, attention, vocab, members, satellites, reserve,
                      survey.describe() if survey is not None else "")


def survey_links(comm, store: Store, o: ModeOptions) -> LinkSurvey | None:
    """Every rank, collectively, before the plan: the start-up link probe (net/probe.py) with a
    member's one-token message of this model, where it can matter (HALO sync under MPI, two
    ranks or more, --link-probe not 0); None elsewhere."""
    t = o.tensor
    if comm is None or comm.Get_size() < 2 or t.sync != "halo" or not t.link_probe:
        return None
    nbytes = wire_report(store.args.dim, t.members_wire)["message_bytes"]
    loss = LinkLoss(dict(t.link_loss), seed=o.seed + 7919, model=t.loss_model) if t.link_loss else None
    return measure_links(comm, nbytes, t.link_probe, loss)


def group_bytes(store: Store, dtype: str):
    """k -> resident bytes of k MLP groups of one layer, as this run computes them."""
    kind, _ = weight_kinds(store.store_dtype, dtype)
    return lambda k: mlp_bytes(store.args, k, kind)


def auto_backup(cluster: ClusterSpec, placed: Placement, unstable: frozenset, group_mb: float,
                reserved_mb: float, budgeted: bool) -> float:
    """--backup-share auto: the share of the unstable ranks' groups rank 0 backs up. All of them
    where its memory has room: the drop budget keeps them few (3 of SmolLM2's 24 groups a layer
    at -n 2, 40 MB), and a backed-up partial is never waited for nor lost (at -n 2 on the testbed
    at 5% loss, perplexity +3% without, exact with). None under --mem-budget (the copies would be
    outside it)."""
    if budgeted or not unstable:
        return 0.0
    need = sum(len(p[r]) for p in placed for r in unstable) * group_mb
    own = sum(len(p[0]) for p in placed) * group_mb + reserved_mb
    room = cluster.ranks[0].memory_mb - own
    return share_in_room(need, room)


def describe_wire(dim: int, wire: str, batch: int = 1) -> str:
    """The wire and its message per round: for one token, and for `batch` decoding sequences
    (a batched step's round carries a row per sequence: more TCP segments to lose)."""
    w = wire_report(dim, wire)
    line = (f"wire {wire} ({w['message_bytes']} B per token and layer, {w['segments']} TCP "
            f"segment{'s' if w['segments'] > 1 else ''}")
    if batch > 1:
        n = HEADER_BYTES + body_nbytes(batch, dim, wire)
        line += f"; {n} B, {segments(n)} segments for a batch of {batch}"
    return line + ")"


def describe(plan: TensorPlan, store: Store) -> str:
    """What rank 0 prints before the run: mode, importance, loss, and the placement."""
    o = plan.options
    t = o.tensor
    predictor = (t.placement != "static" and (t.sync == "halo" or t.sparsity > 0)
                 and store.calibration("predictor_current_A") is not None)
    roles = f"all-reduce among ranks {plan.members}" + (f", satellites {plan.satellites}" if plan.satellites
                                                        else "")
    measured = f"{plan.measured}\n" if plan.measured else ""
    satellites = f", satellites {describe_wire(plan.dim, plan.wire, o.max_batch)}" if plan.satellites else ""
    return (f"{measured}tensor-parallel on {plan.size} ranks, sync {plan.policy.mode} ({roles}), "
            f"placement {t.placement}, "
            f"importance {plan.importance_source}{' + per-token predictor' if predictor else ''}, "
            f"link loss {plan.loss or 'none'}, unstable ranks {sorted(plan.policy.unstable) or 'none'}"
            f"{f', sparsity {t.sparsity:g}' if t.sparsity else ''}, "
            f"members' {describe_wire(plan.dim, plan.members_wire, o.max_batch)}{satellites}\n"
            f"{describe_plan(plan.placement, plan.importance, plan.cluster)}")


def wait_policy(plan: TensorPlan) -> WaitPolicy:
    spin = plan.options.tensor.spin_us
    return WaitPolicy.default(None if spin is None else spin / 1e6)


def max_message_bytes(store: Store, prefill_chunk: int, max_batch: int = 1) -> int:
    """A batched step's hidden states (a prefill chunk beside max_batch decoding rows), or
    max_batch rows of logits of the whole vocabulary, 1 MB at least."""
    a = store.args
    return HEADER.itemsize + max((prefill_chunk + max_batch) * a.dim * 4, max_batch * a.vocab_size * 4,
                                 1 << 20)


def emulated_loss(plan: TensorPlan) -> LinkLoss | None:
    o = plan.options
    return LinkLoss(plan.loss, seed=o.seed, model=o.tensor.loss_model) if plan.loss else None
