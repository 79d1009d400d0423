"""Each rank's part of a tensor-parallel run, built from its store and the plan.

Rank 0 gets the `Lead` (a member that leads: lead.py) and the reference model with its parts
replaced from outside; another member gets a `Member` (member.py) and the same model with its
own head slice; a satellite gets a `Satellite` (satellite.py): MLP groups only. Every rank loads
only its own attention groups, MLP groups and head slice; under --mem-budget through its
`BudgetedWeights` (loading/).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..loading.parts import BudgetedWeights, rank_residency
from ..model.groups import GroupMLP
from ..model.linear import DTYPES
from ..model.llama import Attention, Transformer
from ..net.transport import Transport
from ..store.hdf5 import Store
from .attention import HeldAttention
from .exchange import ComputeClock, Exchange
from .head import HeadRows, VocabSlice
from .held import BudgetedGroups, HeldGroups
from .lead import GatheredHead, Lead
from .member import Member, MemberAttention, MemberMLP
from .placement import Replanner, own_groups, probe_ranks
from .plan import TensorPlan, group_bytes
from .planner import Planner
from .predictor import Predictor
from .reserve import ReplanRoom
from .satellite import Satellite
from .satellites import Satellites
from .speeds import SpeedMeter


def group_loader(store: Store, dtype) -> Callable:
    """(layer, ids) -> GroupMLP of those groups, read from this rank's store."""
    return lambda layer, ids: GroupMLP(store.mlp_groups(layer, ids), ids, dtype)


def residency(store: Store, plan: TensorPlan, rank: int):
    """Under --mem-budget: what this rank keeps resident and streams (from shapes alone: a budget
    too small is found at start, before any weight is read), else None."""
    if not plan.budgeted:
        return None
    o = plan.options
    start, stop = plan.vocab[rank]
    return rank_residency(store.args, store.store_dtype, o.dtype,
                          {l: len(p[rank]) for l, p in enumerate(plan.attention)},
                          {l: len(p[rank]) for l, p in enumerate(plan.placement)}, stop - start,
                          rank == 0, o.loading(), f"rank {rank}", plan.reserve[rank] if plan.reserve else 0)


def rank_weights(store: Store, plan: TensorPlan, rank: int) -> BudgetedWeights | None:
    """Under --mem-budget: this rank's weights, built by its residency (loading/), else None."""
    if not plan.budgeted:
        return None
    o = plan.options
    return BudgetedWeights(store, residency(store, plan, rank), o.loading(), plan.importance, o.dtype,
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


def held_groups(store: Store, plan: TensorPlan, rank: int, weights: BudgetedWeights | None,
                own: dict[int, np.ndarray] | None = None) -> HeldGroups:
    """This rank's MLP groups (`own`: layer -> ids, rank 0's with its probes'), else its
    placement's; a re-plan reads more from its store (under a budget into the room kept for it:
    reserve.py)."""
    read = group_loader(store, DTYPES[plan.options.dtype])
    load = weights.mlp if weights else read
    own = own if own is not None else {layer: p[rank] for layer, p in enumerate(plan.placement)}
    mlps = {layer: load(layer, ids) for layer, ids in own.items() if len(ids)}
    return BudgetedGroups(mlps, read) if weights else HeldGroups(mlps, read)


def build(store: Store, plan: TensorPlan, transport: Transport, log=None, speeds: bool = True):
    """This rank's part: (Lead, model) on rank 0, (Member, model) on another member, (Satellite,
    None) on a satellite. The caller starts nothing: `run` does (run.py). speeds: rank 0 measures
    the members' speeds (tensor/speeds.py; not where ranks are threads of one process)."""
    rank = transport.rank
    weights = rank_weights(store, plan, rank)
    if rank not in plan.members:
        part = Satellite(transport, held_groups(store, plan, rank, weights), clock_of(plan, rank),
                         sparse=plan.options.tensor.sparsity > 0, loading=weights), None
        if roles_change(plan):
            part[0].make_member = joining_member(store, plan, transport)
    elif rank == 0:
        part = lead_part(store, plan, transport, weights, log, speeds)
    else:
        part = member_part(store, plan, transport, weights)
        if roles_change(plan):
            part[0].make_member = joining_member(store, plan, transport)
    if weights is not None:
        weights.start()
    return part


def head_loader(store: Store, plan: TensorPlan) -> Callable:
    """(start, stop) -> those rows of the head as a VocabSlice, read from the store (None: no rows)."""
    dtype = DTYPES[plan.options.dtype]
    return lambda start, stop: VocabSlice(store, start, stop, dtype) if stop > start else None


def clock_of(plan: TensorPlan, rank: int) -> ComputeClock:
    """The rank's compute clock: its declared speed (a device profile) and --slow stretch it."""
    return ComputeClock(plan.cluster.ranks[rank].speed, plan.options.tensor.slow.get(rank))


def member_parts(store: Store, plan: TensorPlan, transport: Transport, weights, own=None) -> dict:
    t = plan.options.tensor
    return {"transport": transport, "exchange": Exchange(transport, plan.members, plan.members_wire),
            "attention": held_attention(store, plan, transport.rank, weights),
            "groups": held_groups(store, plan, transport.rank, weights, own),
            "clock": clock_of(plan, transport.rank), "importance": plan.importance,
            "sparsity": t.sparsity,
            "predictor": Predictor.from_store(store) if t.sparsity > 0 or transport.rank == 0 else None,
            "loading": weights}


def member_part(store: Store, plan: TensorPlan, transport: Transport, weights) -> tuple[Member, Transformer]:
    """A worker member: the model with its own groups' parts, the embedding read from the store
    and its head slice as the output."""
    member = Member(**member_parts(store, plan, transport, weights))
    member.load_head = head_loader(store, plan)
    head = member.load_head(*plan.vocab[transport.rank])
    member.model = model_of(store, plan, member, lambda: head)
    return member, member.model


def lead_part(store: Store, plan: TensorPlan, transport: Transport, weights, log,
              speeds: bool = True) -> tuple[Lead, Transformer]:
    """Rank 0: the lead, with the satellites and the planner, and the model whose head gathers
    every member's logits slice."""
    o, dtype = plan.options, DTYPES[plan.options.dtype]
    t = o.tensor
    # rank 0 computes probe ranks' groups as its own: copies outside a memory budget
    probes = (probe_ranks(plan.cluster, plan.importance, plan.drop_budget)
              if t.placement != "random" and weights is None else set())
    parts = member_parts(store, plan, transport, weights, own_groups(plan.placement, probes))
    replanner = (Replanner(plan.cluster, plan.importance, plan.group_mb, plan.drop_budget)
                 if plan.replan else None)
    copies = group_loader(store, dtype)
    room = None
    if plan.reserve is not None:         # each rank's room as its residency keeps it (from shapes)
        room = ReplanRoom(plan.placement, [residency(store, plan, r).reserve for r in range(plan.size)],
                          group_bytes(store, o.dtype))
    planner = Planner(transport, plan.placement, plan.importance, plan.policy, parts["groups"],
                      HeldGroups({}, copies), replanner, frozenset(probes), log, room=room)
    load_head = head_loader(store, plan)
    planner.head = HeadRows(plan.vocab, load_head(*plan.vocab[0]), load_head, plan.members)
    lead = Lead(parts, plan.policy, None, planner,
                halo_predictor=t.placement != "static" and plan.policy.mode == "halo")
    lead.satellites = Satellites(transport, lead.inbox, plan.satellites, plan.policy, store.args.n_layers,
                                 copies, planner.backups, keep_copies=weights is None)
    lead.chunk = o.prefill_chunk
    if roles_change(plan):               # each worker member's rounds measured: a late one is demoted
        lead.exchange.links = planner.roles.start(plan.members, plan.attention, lead.change_members)
    if plan.replan and speeds:           # the members' speeds measured: a slow one gets fewer groups
        lead.speeds = planner.speeds = SpeedMeter()
    lead.model = model_of(store, plan, lead, lambda: GatheredHead(lead))
    lead.model_bytes = lead.model.weight_bytes()
    planner.resident_bytes = lambda: lead.weight_bytes + lead.model_bytes
    return lead, lead.model


def joining_member(store: Store, plan: TensorPlan, transport: Transport) -> Callable:
    """(members, heads, vocab, groups, clock) -> the Member a promoted satellite becomes: its MLP
    groups (those of the plan that promotes it), the KV heads and head rows that plan gives it
    (read now; their caches filled by rank 0's replay), the members' all-reduce framed."""
    def make(members: list[int], heads: list, vocab: tuple[int, int], groups: HeldGroups,
             clock: ComputeClock) -> Member:
        t = plan.options.tensor
        member = Member(transport, Exchange(transport, members, plan.members_wire, collective=False),
                        held_attention(store, plan, transport.rank), groups, clock, plan.importance,
                        t.sparsity, Predictor.from_store(store) if t.sparsity > 0 else None)
        member.attention_groups.reassign(dict(enumerate(heads)))
        member.load_head = head_loader(store, plan)
        head = member.load_head(*vocab)
        member.model = model_of(store, plan, member, lambda: head)
        member.make_member = make
        return member
    return make


def roles_change(plan: TensorPlan) -> bool:
    """Whether members may be demoted and satellites promoted: HALO re-planning, without a memory
    budget (a budget's residency is laid out for the roles at start)."""
    return plan.replan and not plan.budgeted


def model_of(store: Store, plan: TensorPlan, member: Member, head: Callable) -> Transformer:
    return Transformer.from_store(store, embedding="rows", head=head, dtype=DTYPES[plan.options.dtype],
                                  mlp=lambda layer: MemberMLP(member, layer),
                                  attention=lambda layer: MemberAttention(member, layer))
