"""Each rank's part of a tensor-parallel run, built from its store and the plan.

Rank 0 gets the coordinator and the reference model with distributed attention, MLPs and head in
place of its own; a worker gets what serves its groups (a `Worker` of the star, or a `Follower`
of the all-reduce). Every rank loads only its own attention groups, MLP groups and head slice;
under --mem-budget through its `BudgetedWeights` (loading/).
"""
from __future__ import annotations

from collections.abc import Callable

from ..loading.parts import BudgetedWeights, rank_residency
from ..model.groups import GroupMLP
from ..model.linear import DTYPES
from ..model.llama import Attention, Transformer
from ..store.hdf5 import Store
from .attention import HeldAttention
from .coordinator import Coordinator, DistributedAttention, DistributedHead, DistributedMLP
from .exchange import ComputeClock, Exchange, ExchangeAttention, ExchangeMLP, Follower
from .head import VocabSlice
from .placement import Replanner, probe_ranks
from .plan import TensorPlan
from .predictor import Predictor
from .worker import Worker


def group_loader(store: Store, dtype) -> Callable:
    """(layer, ids) -> GroupMLP of those groups, read from this rank's store."""
    return lambda layer, ids: GroupMLP(store.mlp_groups(layer, ids), ids, dtype)


def head_loader(store: Store, dtype) -> Callable:
    """(start, stop) -> that vocabulary slice of the output head, read from this rank's store."""
    return lambda start, stop: VocabSlice(store, start, stop, dtype)


def rank_weights(store: Store, plan: TensorPlan, rank: int) -> BudgetedWeights | None:
    """Under --mem-budget: what this rank keeps resident and streams (loading/), else None."""
    if not plan.budgeted:
        return None
    o = plan.options
    start, stop = plan.vocab[rank]
    residency = rank_residency(store.args, store.store_dtype, o.dtype,
                               {l: len(p[rank]) for l, p in enumerate(plan.attention)},
                               {l: len(p[rank]) for l, p in enumerate(plan.placement)}, stop - start,
                               rank == 0, o.loading(), f"rank {rank}")
    return BudgetedWeights(store, residency, o.loading(), plan.importance, o.dtype,
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


def make_coordinator(store: Store, plan: TensorPlan, transport, log=None) -> tuple:
    """Rank 0: the coordinator and the reference model with distributed attention, MLPs and head
    in place of its own, the embedding read row by row from the store."""
    o, dtype = plan.options, DTYPES[plan.options.dtype]
    t = o.tensor
    predictor = Predictor.from_store(store) if t.placement != "static" else None
    replanner = (Replanner(plan.cluster, plan.importance, plan.group_mb, plan.drop_budget)
                 if plan.replan else None)
    weights = rank_weights(store, plan, 0)
    # probes back up a rank's groups on rank 0: copies outside a memory budget
    probes = (probe_ranks(plan.cluster, plan.importance, plan.drop_budget)
              if t.placement != "random" and weights is None else set())
    exchange = Exchange(transport, plan.attention, plan.placement) if plan.exchange else None
    coordinator = Coordinator(transport, plan.placement, plan.importance, plan.policy,
                              weights.mlp if weights else group_loader(store, dtype), predictor,
                              t.sparsity, replanner, log, probes=frozenset(probes),
                              attention=plan.attention, held=held_attention(store, plan, 0, weights),
                              vocab=plan.vocab, load_head=head_loader(store, dtype), exchange=exchange,
                              loading=weights, load_copies=group_loader(store, dtype))
    model = Transformer.from_store(store, embedding="rows", head=lambda: DistributedHead(coordinator),
                                   dtype=dtype, mlp=lambda layer: DistributedMLP(coordinator, layer),
                                   attention=lambda layer: DistributedAttention(coordinator, layer))
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
                        sparse=plan.options.tensor.sparsity > 0,
                        held=held_attention(store, plan, rank, weights),
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
    model = Transformer.from_store(store, embedding="rows", head=lambda: head,
                                   dtype=DTYPES[plan.options.dtype],
                                   mlp=lambda layer: ExchangeMLP(exchange, mlps, layer, clock),
                                   attention=lambda layer: ExchangeAttention(exchange, held, layer, clock))
    return Follower(transport, exchange, model, held, mlps, clock, weights)
