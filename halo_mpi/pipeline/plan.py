"""What every rank of the ring must know before it starts: the split of layers, how many
sequences circulate at once, the prefill chunk. Built on rank 0, broadcast.

    plan = make_plan(store.args, jobs, size, options)
    plan = serving_plan(store.args, size, options)           # a server's, prompts not known yet
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import HaloError
from ..loading.parts import budgeted_transformer
from ..model.config import ModelArgs
from ..model.jobs import Job
from ..model.llama import Transformer
from ..net.devices import Device
from ..net.framing import HEADER
from ..options.tree import ModeOptions
from .split import split_layers, stage_costs

DONE_BYTES = 1 << 16    # room for a DONE message's JSON


@dataclass
class Plan:
    split: list[range]          # layers of each rank, contiguous, rank 0's first
    in_flight: int              # S, sequences circulating at once
    chunk: int                  # prompt tokens per prefill message
    dim: int
    n_layers: int
    dtype: str
    max_batch: int = 1          # sequences one stage step may carry (--max-batch)

    @property
    def size(self) -> int:
        return len(self.split)

    @property
    def max_bytes(self) -> int:
        """Largest message: a prefill chunk (chunk, dim) float32, or a DONE."""
        return HEADER.itemsize + max(self.chunk * self.dim * 4, DONE_BYTES)


def make_plan(args: ModelArgs, jobs: list[Job], size: int, o: ModeOptions,
              devices: list[Device] | None = None, bytes_per_weight: float | None = None) -> Plan:
    """The plan of a run of known jobs: --num-sequences of them in flight at once (0: all)."""
    if not jobs:
        raise HaloError("pipeline mode needs at least one prompt")
    for i, job in enumerate(jobs):
        if not job.ids or job.max_len > args.max_seq_len:
            raise HaloError(f"prompt {i} has {len(job.ids)} tokens and asks for {job.max_new} more; the "
                            f"model's context holds 1 to {args.max_seq_len} in all")
    in_flight = min(o.pipeline.num_sequences or len(jobs), len(jobs))
    kv_tokens = sum(sorted(job.max_len for job in jobs)[-in_flight:])   # the S longest, all at once
    return ring_plan(args, size, o, in_flight, kv_tokens, devices, bytes_per_weight)


def serving_plan(args: ModelArgs, size: int, o: ModeOptions, devices: list[Device] | None = None,
                 kv_tokens: int = 0, bytes_per_weight: float | None = None) -> Plan:
    """The plan of a server, whose prompts come later: --num-sequences at once (0: --max-batch per
    rank, so that every stage can be busy with a full batch); `kv_tokens`, the KV cache tokens the
    split may count on."""
    in_flight = o.pipeline.num_sequences or size * o.max_batch
    return ring_plan(args, size, o, in_flight, kv_tokens or in_flight * args.max_seq_len, devices,
                     bytes_per_weight)


def ring_plan(args: ModelArgs, size: int, o: ModeOptions, in_flight: int, kv_tokens: int,
              devices: list[Device] | None, bytes_per_weight: float | None = None) -> Plan:
    """bytes_per_weight: a quantized store's (its weights stay so in memory); None: the dtype's."""
    costs = stage_costs(args, o.dtype, kv_tokens, bytes_per_weight) if devices else None
    return Plan(split=split_layers(args.n_layers, size, devices, costs), in_flight=in_flight,
                chunk=o.prefill_chunk, dim=args.dim, n_layers=args.n_layers, dtype=o.dtype,
                max_batch=o.max_batch)


def quantized_bytes(store) -> float | None:
    """Bytes per weight of a q8_0/q4 store's matrices (they stay so in memory); None otherwise."""
    if store.store_dtype not in ("q8_0", "q4"):
        return None
    a = store.args
    return store.item_bytes("mlp") / (3 * a.group_size * a.dim)


def load_stage_model(store, plan: Plan, rank: int, o: ModeOptions) -> tuple:
    """Only this rank's layers (plus the embedding and head on rank 0) are read from the store:
    (Transformer, None), or under --mem-budget (Transformer, BudgetedWeights) with the
    embedding read from the store, which must then stay open."""
    if o.load.mem_budget is not None:
        return budgeted_transformer(store, o.loading(), plan.dtype, layers=plan.split[rank],
                                    embedding=rank == 0, head=rank == 0, where=f"rank {rank}")
    return Transformer.from_store(store, layers=plan.split[rank], embedding=rank == 0,
                                  head=rank == 0, dtype=plan.dtype), None
