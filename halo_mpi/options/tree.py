"""Every option a mode is opened with, in one tree: each field declares its flag, type, default
and help (options/flags.py), and `check` holds the rules that span fields.

    ModeOptions                     --parallel, --weights, --dtype, --threads, --max-batch, ...
      .tensor: TensorOptions        --sync, --link-loss, --wire-dtype, ...   (tensor mode)
      .pipeline: PipelineOptions    --num-sequences                          (pipeline mode)
      .load: LoadOptions            --mem-budget, --prefetch, ...            (every mode)

`generate`, `evaluate` and `serve` take all of it, `bench` the parts it varies; the mode layer
(halo_mpi/modes/) opens a mode from it, and the engines read the fields they act on. A new
option every mode takes is one field here (see the README's "Layout").
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from ..errors import HaloError
from ..model.config import DTYPE_NAMES
from ..net.loss import LossSchedule
from ..net.ranks import check_ranks
from ..net.wire import WIRE_DTYPES
from .flags import group, option, switch
from .values import (
    Budget,
    auto_or,
    format_link_losses,
    format_ranks,
    format_slowdowns,
    in_range,
    link_losses,
    non_negative_float,
    non_negative_int,
    number,
    positive_float,
    positive_int,
    rank_set,
    rank_slowdowns,
)

DEFAULT_WEIGHTS = os.path.join("weights", "smollm2-135m.h5")
PARALLEL = ("none", "tensor", "pipeline")
PLACEMENTS = ("semantic", "static", "random")


@dataclass(frozen=True)
class LoadOptions:
    """Memory budgets: what a rank keeps resident, and how it streams the rest (loading/)."""
    mem_budget: Budget | None = option(
        "--mem-budget", None, Budget.parse, metavar="SIZE|PERCENT%",
        help="the most weight bytes each rank keeps resident: a size (150MB, 1.5GB) or a share of "
             "its weights (50%). The least important MLP groups (and, if need be, the attention) are "
             "streamed from a scratch file every token (see --prefetch), a layer at a time. Covers "
             "the pinned weights, the load buffers, the head slice and norms; not the interpreter, "
             "torch or the KV cache, reported beside it (default: all resident)")
    load_dir: str | None = option(
        "--load-dir", None, metavar="DIR",
        help="where the scratch file of streamed weights is written (unnamed, removed when the "
             "process ends) (default: the store's directory)")
    prefetch: str = option(
        "--prefetch", "auto", choices=("auto", "on", "off"), also=(("--no-prefetch", "off"),),
        help="on: read the next layers' parts while one computes; off: read each part when it is "
             "needed; auto: on when reads wait on the disk (--cold-reads) or the rank has a core to "
             "leave to its reader, off on a one-core rank reading from the page cache, where the "
             "reader could only take turns with the compute")
    loader: str = option(
        "--loader", "process", choices=("process", "thread"),
        help="who reads ahead: a process of its own (its reads never wait for this process's GIL), "
             "or a thread here")
    read_mbps: float | None = option(
        "--read-mbps", None, positive_float, format=number, metavar="MB/S",
        help="emulate a slow disk: each read of streamed weights takes at least its size / MB/S "
             "(a Pi's SD card: ~40) (default: the disk's own speed)")
    cold: bool = switch(
        "--cold-reads",
        help="read streamed weights with O_DIRECT, past the page cache: they come from the disk "
             "every time (its DMA fills the buffers, no CPU copy), as on a device with no memory to "
             "spare for a page cache")
    leave_a_core: bool = False   # (no flag) streaming with prefetch: one torch thread fewer; set
                                 # by ModeOptions.loading() when --threads is left to the node


@dataclass(frozen=True)
class TensorOptions:
    """Tensor-parallel mode (tensor/): how groups are placed and how partials are waited for."""
    sync: str = option(
        "--sync", "halo", choices=("strict", "halo"),
        help="strict: wait for every partial (the blocking-allreduce baseline); halo: wait for "
             "critical partials, for the rest only until a deadline")
    link_loss: dict[int, float | LossSchedule] = option(
        "--link-loss", {}, link_losses("--link-loss"), format=format_link_losses,
        metavar="RANK:P[@STEP],...",
        help="emulate packet loss P on the link between rank 0 and RANK, both ways, with TCP "
             "retransmission delays (e.g. 2:0.05,3:0.05); with @STEP the loss changes at that step "
             "(prefill chunks count as steps, as in --slow), e.g. 2:0@0,2:0.1@50,2:0.3@100,2:0@150")
    loss_model: str = option(
        "--loss-model", "tcp", choices=("tcp", "rto"),
        help="emulated loss: tcp = fitted to real Linux TCP on the testbed (most losses repaired in "
             "ms, ~200 ms stalls from lost last segments); rto = one 200 ms timeout per lost packet")
    unstable_ranks: frozenset[int] | None = option(
        "--unstable-ranks", None, rank_set("--unstable-ranks"), format=format_ranks, metavar="R,...",
        help="ranks on unreliable links: they get the least important groups and are not waited "
             "for past their deadline (default: the ranks in --link-loss); a hint: the links are "
             "measured too (--link-probe) and while the run goes on")
    link_probe: int = option(
        "--link-probe", 32, non_negative_int, metavar="N",
        help="halo, under MPI: before placing anything, every pair of ranks exchanges up to N "
             "round trips of a member's message; a rank behind a link with stalls (round trips "
             "over 150 ms: TCP retransmissions) starts on an unstable link, its measured on-time rate as its "
             "reliability. Takes milliseconds on clean links, a few seconds on a lossy one; "
             "0: off (every rank starts stable unless named)")
    critical_share: float = option(
        "--critical-share", 0.3, in_range(0, 1, lo_open=True), format=number,
        help="halo: partials are waited for until this share of the layer's importance has "
             "arrived, those of stable ranks always")
    deadline_factor: float = option(
        "--deadline-factor", 1.5, positive_float, format=number,
        help="halo: once the critical partials are in, another one is waited for this factor times "
             "the 90th percentile of how far its link's partials recently lagged behind the "
             "critical ones, plus --deadline-margin-ms; a partial is on time (for re-planning) "
             "within the same bound of its link's round trips")
    deadline_margin_ms: float = option(
        "--deadline-margin-ms", 2.0, non_negative_float, format=number,
        help="halo: added to every deadline")
    backup_share: float | None = option(
        "--backup-share", None, auto_or(in_range(0, 1)), format=lambda v: "auto" if v is None else number(v),
        help="halo: rank 0 also holds this share (0..1) of each unstable rank's groups, the most "
             "important ones, computes them itself when that rank's partial is not there when it "
             "needs it, and never waits for what it can compute; costs rank 0 memory, saves "
             "quality and waiting. auto (the default): all of them, as far as rank 0's memory "
             "(the device profile's memory_mb) has room, none under --mem-budget; 0: pure HALO, "
             "a missing partial counts as zero")
    placement: str = option(
        "--placement", "semantic", choices=PLACEMENTS,
        help="semantic: least important groups on the least reliable ranks, per-token importance "
             "from the predictor; static: the same placement, calibration averages only; random: "
             "groups placed ignoring importance (ablation)")
    sparsity: float = option(
        "--sparsity", 0.0, in_range(0, 1, hi_open=True), format=number,
        help="skip this share of each layer's groups, the predicted least important, in decode "
             "steps (contextual sparsity)")
    drop_budget: float = option(
        "--drop-budget", 0.01, in_range(0, 1, lo_open=True), format=number,
        help="halo: an unstable rank holds at most the least important groups whose share of a "
             "layer's importance, times how often its link is late (1 - reliability), stays within "
             "this budget; the rest goes to reliable ranks")
    wire_dtype: str = option(
        "--wire-dtype", "auto", choices=("auto",) + WIRE_DTYPES,
        help="precision of hidden states and partial sums on the wire: float32 is exact; "
             "float16/bfloat16 halve a message, q8 (int8 blocks of 32 with a float16 scale, as "
             "GGUF's Q8_0) quarters it, so a 576-wide one fits one TCP segment; auto = float32 "
             "with --sync strict, float16 with --sync halo")
    spin_us: float | None = option(
        "--spin-us", None, non_negative_float, format=number,
        help="wait for a message by testing in a loop this many microseconds before sleeping "
             "between tests (default: 5000 when every rank has a core of its own, 0 when ranks "
             "outnumber cores)")
    no_replan: bool = switch(
        "--no-replan", help="keep the first placement even when a link's on-time rate or a "
                            "rank's measured speed changes")
    slow: dict[int, tuple[float, int]] = option(
        "--slow", {}, rank_slowdowns("--slow"), format=format_slowdowns, metavar="RANK:FACTOR@STEP,...",
        help="emulate a device that slows down (a Pi that throttles): from step STEP on, RANK "
             "computes FACTOR times slower (e.g. 1:3@20); rank 0 measures every rank's speed and "
             "moves MLP groups off a slow one (halo)")

    @property
    def wire(self) -> str:
        """--wire-dtype with auto resolved, for the satellites' messages: float32 for strict sync
        (the exact baseline), float16 for HALO: a 576-wide message fits one TCP segment, so a lost
        packet costs a ~10 ms probe instead of a ~200 ms timeout (README, "Wire precision")."""
        if self.wire_dtype != "auto":
            return self.wire_dtype
        return "float32" if self.sync == "strict" else "float16"

    @property
    def members_wire(self) -> str:
        """--wire-dtype with auto resolved, for the stable members' all-reduce: float32 (exact:
        HALO with no unstable rank is strict sync), unless a precision is asked for."""
        return "float32" if self.wire_dtype == "auto" else self.wire_dtype

    @property
    def unstable(self) -> frozenset[int]:
        """The ranks named unstable: --unstable-ranks, else those with emulated loss."""
        return self.unstable_ranks if self.unstable_ranks is not None else frozenset(self.link_loss)


@dataclass(frozen=True)
class PipelineOptions:
    """Pipeline mode (pipeline/): the ring."""
    num_sequences: int = option(
        "--num-sequences", 0, non_negative_int,
        help="pipeline mode: sequences in flight at once on the ring (0: every prompt given at "
             "once; a server: --max-batch per rank, so that every stage can run a full batch)")


@dataclass(frozen=True)
class ModeOptions:
    """How a mode is opened: the model, the split, and the options of each engine."""
    parallel: str = option(
        "--parallel", "none", choices=PARALLEL,
        help="none: one process; tensor: HALO tensor parallelism, every layer's attention, MLP "
             "neuron groups and the head spread over the ranks; pipeline: MDI-LLM layer blocks on a "
             "ring, several sequences in flight")
    weights: str = option(
        "--weights", DEFAULT_WEIGHTS,
        help="HDF5 store; with {rank} in the name, each rank opens its own shard")
    dtype: str = option(
        "--dtype", "float32", choices=tuple(sorted(DTYPE_NAMES)),
        help="weight precision for compute of a float32 or bfloat16 store: float32 is exact; "
             "float16/bfloat16 halve the weights' memory, logits within ~0.1; q8_0 and q4 stores "
             "compute on their quantized weights")
    threads: int = option(
        "--threads", 0, non_negative_int,
        help="torch threads per rank; 0 = this node's cores / ranks on it")
    seed: int = option(
        "--seed", 0, non_negative_int, help="seeds sampling, the loss emulation and random placement")
    prefill_chunk: int = option(
        "--prefill-chunk", 64, positive_int,
        help="prompt tokens per message during prefill (the parallel modes); with batching, the "
             "prompt tokens a step takes beside sequences that are decoding (a joining prompt is "
             "fed in such chunks, so the others are not stalled for long)")
    max_batch: int = option(
        "--max-batch", 8, positive_int,
        help="sequences decoded together, one step for all (continuous batching: generate's "
             "prompts, a server's requests join and leave between steps); 1: one at a time. "
             "Tensor mode: every round of a step carries all its sequences' rows. Pipeline "
             "mode: the most sequences a stage runs in one step, of those waiting at it "
             "(--num-sequences circulate)")
    rank_timeout: float = option(
        "--rank-timeout", 60.0, positive_float, format=number, metavar="S",
        help="a rank silent for S seconds (no message, no heartbeat: frozen or dead) is "
             "unreachable: HALO sync re-places its MLP groups and goes on; strict sync, pipeline "
             "mode, and HALO when it holds attention or head rows end with one line naming it and a "
             "non-zero exit; it also bounds (at least 60 s) MPI's start and end, which wait for "
             "every rank, a dead one too under mpiexec -disable-auto-cleanup")
    verify: bool = switch(
        "--verify",
        help="check every weight read against the CRC-32 written at convert (a damaged file is "
             "one line naming the dataset); costs a CRC-32 pass over what is read")
    device_profile: str | None = option(
        "--device-profile", None, metavar="TOML",
        help="per-rank speed, memory_mb and link reliability ([default] and [rank.N] tables, see "
             "halo_mpi/net/devices.py). Tensor mode places groups by them (speeds below 1 are "
             "emulated by stretching workers' compute); pipeline mode splits layers by speed, "
             "counting rank 0's head, within the memory budgets (default: equal shares)")
    tensor: TensorOptions = group(TensorOptions, "tensor-parallel mode (--parallel tensor)")
    pipeline: PipelineOptions = group(PipelineOptions, "pipeline mode (--parallel pipeline)")
    load: LoadOptions = group(LoadOptions, "memory budget (every mode)")

    @classmethod
    def of(cls, **flat) -> ModeOptions:
        """The tree from flat field names, each a field of ModeOptions or of one of its groups
        (the names are unique across the tree): ModeOptions.of(parallel="tensor", sync="strict",
        mem_budget=Budget.parse("50%"))."""
        groups = {f.name: f.default_factory for f in fields(cls) if "group" in f.metadata}
        own = {f.name for f in fields(cls)} - set(groups)
        inner = {g: {k: v for k, v in flat.items() if k in {f.name for f in fields(t)}}
                 for g, t in groups.items()}
        unknown = set(flat) - own - {k for v in inner.values() for k in v}
        if unknown:
            raise TypeError(f"ModeOptions.of: no option field {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in flat.items() if k in own},
                   **{g: groups[g](**kw) for g, kw in inner.items()})

    def loading(self) -> LoadOptions:
        """The load options as a rank applies them: with --threads 0, a streaming rank that reads
        ahead leaves a core to its reader."""
        return replace(self.load, leave_a_core=self.threads == 0)

    def store_path(self, rank: int) -> str:
        """This rank's store: its shard when --weights has {rank} in the name."""
        return self.weights.format(rank=rank) if "{rank}" in self.weights else self.weights


def check(o: ModeOptions, size: int):
    """The rules that span options, once the world size is known; one line each."""
    if o.parallel == "none" and size > 1:
        raise HaloError(f"this run has {size} MPI ranks; choose --parallel tensor or --parallel "
                        f"pipeline, or launch with -n 1")
    if o.parallel == "tensor":
        check_tensor(o, size)


def check_tensor(o: ModeOptions, size: int):
    t, workers = o.tensor, range(1, size)
    check_ranks(t.link_loss, "--link-loss", workers)
    check_ranks(t.slow, "--slow", range(size), "the ranks are")
    if t.unstable_ranks is not None:
        check_ranks(t.unstable_ranks, "--unstable-ranks", workers)
    if o.load.mem_budget is not None and t.backup_share:
        raise HaloError("--backup-share keeps copies of other ranks' groups outside the memory "
                        "budget: not with --mem-budget")
