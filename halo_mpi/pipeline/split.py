"""Pipeline stages: which contiguous block of layers each rank holds.

All blocks of a LLaMA have the same shape, so a split is one count per rank, in rank order (rank 0
first: it also holds the embedding and the head). Without a device profile the counts are equal
(the remainder goes to the last ranks, since rank 0 already carries the head). With one:
- speeds: the counts minimise the slowest stage's time per token, where a stage's work is the
  bytes of weights it streams per token (decoding is memory-bandwidth bound), so rank 0's head
  counts as `head_blocks` extra blocks;
- memory budgets: no rank holds more blocks (weights + KV caches of the sequences in flight,
  plus the embedding and head on rank 0) than its budget allows; a model that cannot fit is a
  HaloError naming the rank and the megabytes at stake.

The device profile (speeds, memory budgets) is read by net/devices.py, as in tensor mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import HaloError
from ..model.config import ModelArgs
from ..net.devices import Device

MB = 1e6
HALF_DTYPES = {"float16", "bfloat16"}


@dataclass
class StageCosts:
    """Bytes a stage holds and streams, per block and for rank 0's embedding + head."""
    block_bytes: int      # weights of one transformer block at the compute dtype
    kv_bytes: int         # KV caches of one block for all sequences in flight
    ends_bytes: int       # embedding, final norm and head (rank 0 only)
    head_blocks: float    # the head's per-token work in blocks (bytes streamed per token)


def stage_costs(args: ModelArgs, dtype: str, kv_tokens: int,
                bytes_per_weight: float | None = None) -> StageCosts:
    """Sizes at the compute dtype (or, for a quantized store, at its bytes per weight);
    kv_tokens = cache slots of all sequences in flight together."""
    w = bytes_per_weight or (2 if dtype in HALF_DTYPES else 4)   # bytes per weight of a Linear
    hd = args.head_dim
    attn = args.dim * hd * (2 * args.n_heads + 2 * args.n_kv_heads)
    block = (attn + 3 * args.dim * args.hidden_dim) * w + 2 * args.dim * 4   # + two fp32 norms
    kv = 2 * args.n_kv_heads * hd * 4 * kv_tokens             # k and v, fp32
    table = args.vocab_size * args.dim
    # tied: one table in the head's dtype; untied: an fp32 embedding plus the head
    ends = table * w + args.dim * 4 if args.tied_embeddings else table * (4 + w) + args.dim * 4
    return StageCosts(block, kv, ends, head_blocks=table * w / block)


def split_layers(n_layers: int, size: int, devices: list[Device] | None = None,
                 costs: StageCosts | None = None) -> list[range]:
    """Contiguous blocks of layers, one per rank; rank 0's comes first.

    Without devices: equal counts. With devices (and their costs): balanced by speed, with rank
    0's head counted as work, within the memory budgets."""
    if size > n_layers:
        raise HaloError(f"pipeline mode gives every rank at least one of the model's {n_layers} "
                        f"layers, but the run has {size} ranks; launch with -n {n_layers} or fewer")
    if devices is None:
        devices, caps, head = [Device() for _ in range(size)], [n_layers] * size, 0.0
    else:
        caps, head = capacities(n_layers, devices, costs), costs.head_blocks
    counts = [1] * size
    for _ in range(n_layers - size):
        open_ranks = [r for r in range(size) if counts[r] < caps[r]]
        # the rank that would finish its block soonest takes the next layer; ties go to later ranks
        # (greedy by earliest finish is optimal for identical unit jobs on machines of any speed)
        r = min(open_ranks, key=lambda r: ((counts[r] + 1 + (head if r == 0 else 0)) / devices[r].speed, -r))
        counts[r] += 1
    starts = [sum(counts[:r]) for r in range(size)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


def capacities(n_layers: int, devices: list[Device], costs: StageCosts) -> list[int]:
    """Most blocks each rank can hold within its budget; HaloError if the model cannot fit."""
    per_block = costs.block_bytes + costs.kv_bytes
    caps = []
    for r, d in enumerate(devices):
        if d.memory_mb == math.inf:
            caps.append(n_layers)
            continue
        fixed = costs.ends_bytes if r == 0 else 0
        cap = math.floor((d.memory_mb * MB - fixed) / per_block)
        if cap < 1:
            what = f" the embedding and head ({fixed / MB:.0f} MB) plus" if r == 0 else ""
            raise HaloError(f"rank {r}'s memory budget of {d.memory_mb:.0f} MB cannot hold{what} one "
                            f"block with its KV caches ({per_block / MB:.1f} MB); raise memory_mb "
                            f"for rank {r} in the device profile or use fewer sequences")
        caps.append(min(cap, n_layers))
    if sum(caps) < n_layers:
        need = n_layers * per_block + costs.ends_bytes
        have = sum(d.memory_mb for d in devices) * MB
        per_rank = ", ".join(f"rank {r}: {c}" for r, c in enumerate(caps))
        raise HaloError(f"the model's {n_layers} blocks do not fit the device profile: the budgets "
                        f"hold {sum(caps)} blocks ({per_rank}); "
                        f"about {need / MB:.0f} MB are needed, {have / MB:.0f} MB are budgeted; "
                        f"add ranks, raise memory_mb or use fewer sequences")
    return caps
