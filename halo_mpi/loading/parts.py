"""A rank's attention and MLP layers under a memory budget: pinned ones built resident, streamed
ones built once, written to the scratch file in their compute layout and loaded per use.

`BudgetedWeights` is what the modes call instead of building `GroupMLP`s and `Attention`s
directly; the model code is unchanged (a `StreamedMLP` has GroupMLP's calls, a
`StreamedAttention` Attention's). Building a layer from the store's form costs more than the layer
computes (q4: unpacking and repacking for the int4 kernel; float32: the transpose into x @ W_t
layout; measured in the closing note of the budget issue), so the parts are built once at start
and streamed in the exact bytes the kernels use.

    weights = BudgetedWeights(store, residency, LoadOptions(...), importance, dtype)
    model = Transformer.from_store(store, mlp=..., attention=...)   # through weights.mlp/attention
    weights.start()                         # the reader (a process of its own by default)
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..model.config import ModelArgs
from ..model.groups import GroupMLP
from ..model.linear import DTYPES, Linear, make_linear
from ..model.llama import Attention
from ..model.quant import from_records
from ..options.tree import LoadOptions
from ..stats import rss_mb
from .budget import (
    LayerShare,
    Residency,
    attention_bytes,
    linear_bytes,
    mlp_bytes,
    plan_residency,
    weight_kinds,
)
from .cache import PAGE, Part, ScratchFile, WeightCache


def prefetching(o: LoadOptions) -> bool:
    """Whether a rank reads ahead (--prefetch). auto: read ahead when the reads wait on the disk
    (cold) or a core can be left to the reader. From the page cache a read is a CPU copy: on a
    rank with one core the reader only takes turns with the compute (measured at -n 2, a 50%
    budget: float32 44.6 ms/token with prefetch, 35.5 without; q4 20.2 and 17.7), while reads that
    wait on the disk overlap (cold q4 at 80%, -n 2: 23.2 against 53.4)."""
    if o.prefetch in ("on", "off"):
        return o.prefetch == "on"
    return o.cold or torch.get_num_threads() > 1


def rank_residency(args: ModelArgs, store_dtype: str, dtype: str, heads: dict[int, int],
                   groups: dict[int, int], head_rows: int, final_norm: bool, o: LoadOptions,
                   where: str = "this rank", reserve: int = 0) -> Residency:
    """The residency of a rank holding heads[layer] KV heads and groups[layer] MLP groups of the
    given layers and head_rows rows of the output head, with `reserve` bytes kept for re-plans
    (budget.py), from shapes alone."""
    layer_kind, head_kind = weight_kinds(store_dtype, dtype)
    layers = [LayerShare(l, attention_bytes(args, heads.get(l, 0), layer_kind) if heads.get(l) else 0,
                         groups.get(l, 0), lambda k: mlp_bytes(args, k, layer_kind) if k else 0)
              for l in sorted(set(heads) | set(groups))]
    norms = 4 * args.dim * (2 * len(layers) + (1 if final_norm else 0))
    fixed = (linear_bytes(head_rows, args.dim, head_kind) if head_rows else 0) + norms
    return plan_residency(layers, fixed, o.mem_budget.bytes, o.mem_budget.share, prefetching(o), where,
                          reserve)


def bind_layers(linears: list, layout: list[tuple[int, int, torch.dtype, tuple]]):
    """A Part's bind: views of a loaded buffer as the layers' tensors, in `layout` order. The views
    of each buffer are made once (the cache hands the same buffer object for the same slot), so a
    load costs a few attribute assignments here."""
    made: dict[int, list] = {}

    def bind(buf: np.ndarray | None):
        if buf is None:
            for lin in linears:
                lin.bind(None)
            return
        views = made.get(id(buf))
        if views is None:
            tensors = iter(torch.from_numpy(buf[o:o + n]).view(dt).view(shape) for o, n, dt, shape in layout)
            views = made[id(buf)] = [[next(tensors) for _ in lin.tensors()] for lin in linears]
        for lin, ts in zip(linears, views):
            lin.bind(ts)
    return bind


@dataclass
class Piece:
    """A streamed attention or MLP of a layer as first written (start() moves it into its
    layer's part)."""
    order: int                         # 0 attention, 1 MLP: the order a layer uses them
    linears: list
    offset: int                        # in the building file
    nbytes: int
    layout: list                       # (offset in the piece, bytes, dtype, shape) per tensor
    part: Part | None = None


def read_back(scratch: ScratchFile, piece: Piece) -> np.ndarray:
    buf = np.empty(piece.nbytes, np.uint8)
    scratch.read(buf, piece.offset, None, False)
    return buf


class StreamedMLP:
    """A layer's MLP groups under a budget: the most important ones resident (`pinned`), the rest
    computed while their layer's part is loaded; in HALO sync a part not loaded in time may be
    skipped (its groups counted in `late_groups`), never in strict sync, nor when the layer's
    attention is in the same part (the attention has waited for it already)."""

    def __init__(self, ids: np.ndarray, pinned: GroupMLP | None, streamed: GroupMLP, piece: Piece,
                 cache: WeightCache, skippable: bool, dim: int):
        self.pinned, self.streamed, self.piece, self.cache = pinned, streamed, piece, cache
        self.skippable, self.dim = skippable, dim
        self.ids = ids                                  # as placed: masks given to subset follow it
        where = {int(g): i for i, g in enumerate(ids)}
        self.pinned_at = np.array([where[int(g)] for g in (pinned.ids if pinned else [])], np.int64)
        self.streamed_at = np.array([where[int(g)] for g in streamed.ids], np.int64)
        self.group_size = streamed.group_size
        self.hidden = len(self.ids) * self.group_size
        self.late_groups = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(T, dim) -> (T, dim)."""
        return self._sum(x, None)

    def subset(self, x: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
        """Over the kept groups (keep: (n,) bool in `ids` order)."""
        return self._sum(x, np.asarray(keep, bool))

    def _sum(self, x: torch.Tensor, keep) -> torch.Tensor:
        if self.pinned is None:
            out = torch.zeros(x.shape[0], self.dim)
        else:
            out = self.pinned(x) if keep is None else self.pinned.subset(x, keep[self.pinned_at])
        streamed = None if keep is None else keep[self.streamed_at]
        if streamed is not None and not streamed.any():
            return out
        if self.cache.acquire(self.piece.part, self.skippable):
            out += self.streamed(x) if streamed is None else self.streamed.subset(x, streamed)
        else:
            self.late_groups += len(self.streamed.ids) if streamed is None else int(streamed.sum())
        return out

    @property
    def nbytes(self) -> int:            # the streamed part sits in the cache's buffers
        return 0 if self.pinned is None else self.pinned.nbytes

    def linears(self) -> list:
        return (self.pinned.linears() if self.pinned is not None else []) + self.streamed.linears()


class StreamedAttention:
    """A layer's attention groups under a budget, loaded whenever it appends or attends."""

    def __init__(self, attention: Attention, piece: Piece, cache: WeightCache):
        self.attention, self.piece, self.cache = attention, piece, cache

    def __getattr__(self, name):        # ids, n_kv, n_heads, args ...
        return getattr(self.attention, name)

    def append(self, *args, **kw):
        self.cache.acquire(self.piece.part)
        return self.attention.append(*args, **kw)

    def attend(self, *args, **kw):
        self.cache.acquire(self.piece.part)
        return self.attention.attend(*args, **kw)

    def ragged_over(self, *args, **kw):
        self.cache.acquire(self.piece.part)
        return self.attention.ragged_over(*args, **kw)

    def __call__(self, *args, **kw):
        self.cache.acquire(self.piece.part)
        return self.attention(*args, **kw)

    nbytes = 0                          # its weights sit in the cache's buffers


def fixed_mmap_threshold(size: int = 128 * 1024):
    """Make glibc serve every allocation over `size` by its own mmap, returned to the system when
    freed. By default glibc raises that threshold the first time such a block is freed, after
    which the build's transients (each layer's arrays before they take their compute layout) stay
    in its heap: measured on SmolLM2 float32 at a 50% budget, peak RSS 647 MB instead of 512 MB
    (233 MB before loading, 265 MB of weights). Without glibc, nothing is done."""
    try:
        ctypes.CDLL(None).mallopt(-3, size)      # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class BudgetedWeights:
    """Builds a rank's layers under `residency` (module docstring)."""

    def __init__(self, store, residency: Residency, o: LoadOptions, importance: np.ndarray | None,
                 dtype: str = "float32", skippable: bool = False):
        self.store, self.residency, self.options = store, residency, o
        self.rss_before_mb = rss_mb()        # the process before any weight: part of the overhead
        fixed_mmap_threshold()
        self.importance, self.dtype, self.skippable = importance, DTYPES[dtype], skippable
        self.cache = None
        if residency.streaming:
            directory = o.load_dir or os.path.dirname(os.path.abspath(store.path))
            self.cache = WeightCache(ScratchFile(directory), residency.slots, prefetching(o),
                                     o.read_mbps, o.cold, o.loader)
            self.building = ScratchFile(directory)     # pieces as built, laid out anew by start()
        self.pieces: dict[int, list[Piece]] = {}
        self.mlps: list[StreamedMLP] = []
        self.threads_note = ""

    def _stream(self, layer: int, order: int, module) -> Piece:
        """Write module's tensors to the building file and let go of them; start() gathers each
        layer's pieces into its part."""
        linears = module.linears()
        tensors = [t for lin in linears for t in lin.tensors()]
        raw = [t.contiguous().reshape(-1).view(torch.uint8).numpy() for t in tensors]
        offset, offsets = self.building.append(raw)
        layout = [(o, r.nbytes, t.dtype, tuple(t.shape)) for o, r, t in zip(offsets, raw, tensors)]
        for lin in linears:
            lin.bind(None)
        piece = Piece(order, linears, offset, offsets[-1] + raw[-1].nbytes, layout)
        self.pieces.setdefault(layer, []).append(piece)
        return piece

    def mlp(self, layer: int, ids) -> GroupMLP | StreamedMLP:
        """The MLP of these groups of `layer`: its least important `streamed_groups` streamed."""
        ids = np.asarray(ids)
        k = min(self.residency.streamed_groups, len(ids)) if self.cache else 0
        if k == 0:
            return GroupMLP(self.store.mlp_groups(layer, ids), ids, self.dtype)
        imp = (self.importance[layer, ids] if self.importance is not None
               else np.zeros(len(ids)))
        order = np.argsort(-imp, kind="stable")            # most important first
        keep, stream = np.sort(ids[order[:len(ids) - k]]), np.sort(ids[order[len(ids) - k:]])
        pinned = GroupMLP(self.store.mlp_groups(layer, keep), keep, self.dtype) if len(keep) else None
        streamed = GroupMLP(self.store.mlp_groups(layer, stream), stream, self.dtype)
        piece = self._stream(layer, 1, streamed)
        mlp = StreamedMLP(ids, pinned, streamed, piece, self.cache, self.skippable, self.store.args.dim)
        self.mlps.append(mlp)
        return mlp

    def attention(self, layer: int, ids=None) -> Attention | StreamedAttention:
        attention = Attention(self.store.args, self.store.attn_groups(layer, ids), ids, self.dtype)
        if self.cache is None or not self.residency.stream_attention:
            return attention
        return StreamedAttention(attention, self._stream(layer, 0, attention), self.cache)

    def start(self):
        """Every piece is built: lay each layer's pieces out as one part, in the order a token
        uses them (attention first, as built for the model; a worker builds its MLPs first), settle
        the scratch file and start reading ahead."""
        if self.cache is None:
            return
        scratch = self.cache.scratch
        for layer in sorted(self.pieces):
            pieces = sorted(self.pieces[layer], key=lambda p: p.order)
            blocks = [read_back(self.building, p) for p in pieces]
            scratch.pad_to(PAGE)                          # parts start at pages (O_DIRECT reads)
            offset, offsets = scratch.append(blocks)
            layout = [(at + o, n, dt, shape) for at, p in zip(offsets, pieces)
                      for o, n, dt, shape in p.layout]
            part = Part(f"layer {layer}", (layer,), offsets[-1] + blocks[-1].nbytes, offset,
                        bind_layers([lin for p in pieces for lin in p.linears], layout))
            for p in pieces:
                p.part = part
            self.cache.add(part)
        self.building.close()
        scratch.settle(self.options.cold)
        self.cache.start()
        if self.options.leave_a_core and self.cache.prefetch and torch.get_num_threads() > 1:
            # the reader copies parts out of the page cache, a CPU copy: with every core computing
            # it slowed float32 decode at a 50% budget from 42 to 72 ms/token on 2 cores (README)
            torch.set_num_threads(torch.get_num_threads() - 1)
            self.threads_note = f"; torch threads {torch.get_num_threads()} (a core left to the reader)"

    def close(self):
        if self.cache is not None:
            self.cache.close()
            self.building.close()

    def describe(self) -> str:
        return self.residency.describe() + self.threads_note

    @property
    def buffer_bytes(self) -> int:
        """The load buffers' bytes (the pinned parts count in their layers' nbytes)."""
        return self.cache.resident_bytes if self.cache is not None else 0

    def stats(self) -> dict:
        """What the budget covers and how loading went (bytes, counts, seconds)."""
        r = self.residency
        out = {"budget_bytes": r.budget, "share_bytes": r.share, "resident_bytes": r.resident,
               "reserve_bytes": r.reserve,
               "streamed_bytes_per_token": r.streamed, "plan": self.describe(),
               "late_groups": sum(m.late_groups for m in self.mlps),
               "rss_before_weights_mb": self.rss_before_mb}
        if self.cache is not None:
            out.update(self.cache.stats.as_dict())
            out["buffer_bytes"] = self.cache.resident_bytes
            out["reader_rss_mb"] = self.cache.reader_rss_mb
        return out


def describe_loading(s: dict, tokens: int) -> str:
    """One line of a rank's loading statistics (BudgetedWeights.stats) over `tokens` tokens."""
    before = f"; the process held {s['rss_before_weights_mb']:.0f} MB before loading weights"
    if "reads" not in s:
        return "loading: nothing streamed" + before
    per = max(tokens, 1)
    return (f"loading: {s['bytes_read'] / 1e6 / per:.1f} MB read per token, hit rate "
            f"{s['hit_rate']:.2f}, blocked {1e3 * s['blocked_s'] / per:.1f} ms per token, reads "
            f"{s['reads']} taking {s['read_s']:.2f} s, late parts {s['late']} "
            f"({s['late_groups']} MLP groups counted missing){before}")


def head_linear(store, start: int, stop: int, dtype=torch.float32, chunk: int = 4096):
    """Rows [start, stop) of the output head as a layer; float rows are read `chunk` at a time
    (Linear.from_row_chunks), quantized ones at once (their records are smaller than the layer)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if store.store_dtype in ("q8_0", "q4"):
        return make_linear(from_records(store.output_rows(start, stop), "row"))
    chunks = ((a - start, store.output_rows(a, min(a + chunk, stop))) for a in range(start, stop, chunk))
    return Linear.from_row_chunks(stop - start, store.args.dim, chunks, dtype)


def static_importance(store) -> np.ndarray | None:
    """(n_layers, G) calibration importance of the MLP groups, if the store has it."""
    imp = store.calibration("static_importance")
    a = store.args
    return imp if imp is not None and imp.shape == (a.n_layers, a.mlp_groups) else None


def budgeted_transformer(store, o: LoadOptions, dtype: str = "float32", layers=None,
                         embedding: bool = True, head: bool = True, where: str = "this rank"):
    """The model (or a pipeline stage's layers) under `o.mem_budget`, the embedding read from the
    store (keep it open): (Transformer, BudgetedWeights), the reader already started."""
    from ..model.llama import Transformer
    a = store.args
    layers = list(range(a.n_layers)) if layers is None else list(layers)
    residency = rank_residency(a, store.store_dtype, dtype, {l: a.n_kv_heads for l in layers},
                               {l: a.mlp_groups for l in layers}, a.vocab_size if head else 0, head, o,
                               where)
    weights = BudgetedWeights(store, residency, o, static_importance(store), dtype)
    groups, heads = np.arange(a.mlp_groups), np.arange(a.n_kv_heads)
    try:
        model = Transformer.from_store(store, layers=layers, embedding="rows" if embedding else False,
                                       head=(lambda: head_linear(store, 0, a.vocab_size, dtype)) if head
                                       else False, dtype=dtype,
                                       mlp=lambda layer: weights.mlp(layer, groups),
                                       attention=lambda layer: weights.attention(layer, heads))
        weights.start()
    except BaseException:
        weights.close()
        raise
    return model, weights
