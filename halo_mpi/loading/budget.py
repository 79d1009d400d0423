"""How much of a rank's weights stay resident under `--mem-budget`, and what streams.

A token uses every layer's attention and MLP in order, so the weights a rank cannot keep are read
again every token, cyclically: one part per layer (its streamed attention and MLP groups, read
together). For a cyclic order the best cache keeps a fixed set resident
(pinned) and streams the rest through a few load buffers (slots): the buffer just used holds what
is needed furthest ahead, so it is the one to refill (Belady's rule). The choice is then how much
to pin: every byte pinned is a byte not read per token, but each slot costs as much as the largest
streamed part. `plan_residency` tries each split (the attention of every layer pinned or
streamed; the s least important MLP groups of every layer streamed, s = 0..G) and keeps the one
that fits the budget and reads the fewest bytes per token.

What the budget covers: the weights this rank keeps resident, i.e. its pinned parts, its slots,
its slice of the output head and the norms, and in HALO sync the room kept for the MLP groups a
re-plan may move here (`reserve`: read resident when they come, tensor/held.py). Not covered
(reported beside it): the interpreter with torch and h5py, the KV cache, activations and
messages. The embedding is read from the store one row per token (not resident). Sizes are exact,
from the shapes (`linear_bytes`), known before anything is loaded, so a budget too small fails at
once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import HaloError
from ..model.config import ModelArgs

ITEM = {"float32": 4, "bfloat16": 2, "float16": 2}
_TILE_N, _BLOCK = 64, 32          # the int4 kernel's row tile and quantization block (qlinear.py)
PART_PAD = 8 * 64 + 4096          # a part's tensors (8 at most) start at 64-byte boundaries, and a
                                  # load buffer is whole pages (cold reads use O_DIRECT)


def size(n: float) -> str:
    """Bytes for a reader: 1.5 GB, 134.5 MB, 2.0 KB, 12 B."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n:.0f} B"


def linear_bytes(N: int, K: int, kind: str) -> int:
    """Resident bytes of an (N, K) weight computed as `kind` (a float dtype, or q8_0 / q4 on the
    int4 kernel: rows padded to 64, q8_0 as two 4-bit halves, a bfloat16 scale and offset per block
    of 32 and row)."""
    if kind in ITEM:
        return N * K * ITEM[kind]
    halves = 2 if kind == "q8_0" else 1
    P = -(-N // _TILE_N) * _TILE_N
    return halves * P * K // 2 + (K // _BLOCK) * halves * P * 2 * 2


def weight_kinds(store_dtype: str, dtype: str) -> tuple[str, str]:
    """How the layers' and the head's weights are computed: (layers, head)."""
    if store_dtype in ("q8_0", "q4"):
        return store_dtype, "q8_0"          # quantized stores keep the head in q8_0
    return dtype, dtype


def mlp_bytes(args: ModelArgs, groups: int, kind: str) -> int:
    gs = args.group_size
    return linear_bytes(2 * groups * gs, args.dim, kind) + linear_bytes(args.dim, groups * gs, kind)


def attention_bytes(args: ModelArgs, heads: int, kind: str) -> int:
    R, hd = args.n_rep * args.head_dim, args.head_dim
    return linear_bytes((R + 2 * hd) * heads, args.dim, kind) + linear_bytes(args.dim, R * heads, kind)


@dataclass
class LayerShare:
    """What a rank holds of one layer."""
    layer: int
    attention: int                       # bytes of its attention groups (0: none)
    groups: int                          # MLP groups held
    mlp_bytes: Callable[[int], int]      # bytes of k of them


@dataclass
class Residency:
    budget: int                 # bytes the weights may take
    share: int                  # bytes of this rank's weights, all resident
    fixed: int                  # always resident: head slice, norms
    stream_attention: bool      # every layer's attention streamed (else pinned)
    streamed_groups: int        # per layer, the least important this many MLP groups stream
    slots: int                  # load buffers
    slot_bytes: int             # each, the largest streamed part
    pinned: int                 # bytes of the pinned attention and MLP groups
    streamed: int               # bytes read per token
    reserve: int = 0            # bytes kept for the groups re-plans may move here
    reserve_wanted: int = 0     # ... what they may need, where the budget keeps less

    @property
    def resident(self) -> int:
        return self.fixed + self.pinned + self.slots * self.slot_bytes

    @property
    def streaming(self) -> bool:
        return self.streamed > 0

    def describe(self) -> str:
        kept = f"; {size(self.reserve)} kept for re-plans" if self.reserve else ""
        if self.reserve_wanted > self.reserve:
            kept = f"; {size(self.reserve)} kept for re-plans (of {size(self.reserve_wanted)} they may need)"
        if not self.streaming:
            return (f"budget {size(self.budget)}: all {size(self.share)} of weights resident, nothing "
                    f"streamed{kept}")
        what = ", ".join(w for w, on in (("attention", self.stream_attention),
                                         (f"{self.streamed_groups} MLP groups per layer",
                                          self.streamed_groups > 0)) if on)
        return (f"budget {size(self.budget)} of {size(self.share)}: resident {size(self.resident)} "
                f"(pinned {size(self.pinned)}, head and norms {size(self.fixed)}, {self.slots} load "
                f"buffers of {size(self.slot_bytes)}); streamed {size(self.streamed)} per token ({what})"
                f"{kept}")


RESERVE_TRIED = (1.0, 0.75, 0.5, 0.25, 0.0)   # shares of the re-plans' room a budget tries to keep


def plan_residency(layers: list[LayerShare], fixed: int, budget: float | None, share: float | None,
                   prefetch: bool = True, where: str = "this rank", reserve: int = 0) -> Residency:
    """The split of the parts into pinned and streamed that fits `budget` bytes (or `share` of the
    rank's weights) less `reserve` and reads the fewest bytes per token (module docstring). A
    budget too small to keep the whole reserve keeps the largest share of it that fits
    (`RESERVE_TRIED`), and whatever its split leaves over: the re-plans that need more are not
    made (tensor/reserve.py)."""
    total = fixed + sum(la.attention + la.mlp_bytes(la.groups) for la in layers)
    limit = int(budget if budget is not None else share * total)
    least = None
    for kept in (RESERVE_TRIED if reserve else (0.0,)):
        best, least = best_split(layers, fixed, total, limit - int(kept * reserve), prefetch)
        if best is not None:
            best.budget, best.share = limit, total
            best.reserve, best.reserve_wanted = limit - best.resident, reserve
            return best
    raise HaloError(f"--mem-budget: {size(limit)} is too small for {where}: it needs at least "
                    f"{size(least.resident)} (head slice and norms {size(fixed)}, pinned "
                    f"{size(least.pinned)}, {least.slots} load buffers of {size(least.slot_bytes)} "
                    f"for its largest streamed part) of its {size(total)} of weights")


def best_split(layers: list[LayerShare], fixed: int, total: int, limit: int, prefetch: bool
               ) -> tuple[Residency | None, Residency]:
    """(the split within `limit` that reads the fewest bytes per token, or None; the split that
    needs the least memory). total: the rank's weights, all resident."""
    best, least = None, None
    for stream_attention in (False, True):
        for s in range(max((la.groups for la in layers), default=0) + 1):
            pinned = streamed = largest = 0
            for la in layers:     # a layer's streamed attention and MLP groups are one part
                k = min(s, la.groups)
                pinned += la.mlp_bytes(la.groups - k) if k < la.groups else 0
                part = (la.mlp_bytes(k) if k else 0) + (la.attention if stream_attention else 0)
                pinned += 0 if stream_attention else la.attention
                streamed += part
                largest = max(largest, part + PART_PAD if part else 0)
            for slots in ((3, 2) if prefetch else (1,)) if streamed else (0,):
                r = Residency(limit, total, fixed, stream_attention, s, slots, largest, pinned, streamed)
                if least is None or r.resident < least.resident:
                    least = r
                better = best is None or (r.streamed, -r.slots) < (best.streamed, -best.slots)
                if r.resident <= limit and better:
                    best = r
    return best, least
