"""Argument types and option groups that several subcommands share, and options -> dataclasses."""
from __future__ import annotations

import argparse
import os
from dataclasses import fields

from ..model.config import DTYPE_NAMES
from ..net.launch import threads_per_rank
from ..net.wire import WIRE_DTYPES

DEFAULT_WEIGHTS = os.path.join("weights", "smollm2-135m.h5")
DTYPE_CHOICES = tuple(sorted(DTYPE_NAMES))


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative_float(s: str) -> float:
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def top_p(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def options_from(cls, a: argparse.Namespace, **overrides):
    """A dataclass of options (TensorOptions, ...) filled once from the parsed arguments."""
    values = {f.name: getattr(a, f.name) for f in fields(cls) if hasattr(a, f.name)}
    return cls(**{**values, **overrides})


def add_weights_argument(p, help_text: str = "HDF5 store"):
    p.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help=f"{help_text}; with {{rank}} in the name, each rank opens its own shard "
                        f"(default: %(default)s)")


def add_threads_argument(p):
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per rank; 0 = this node's cores / ranks on it (default: %(default)s)")


def add_dtype_argument(p):
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                   help="weight precision for compute of a float32 or bfloat16 store: float32 is "
                        "exact; float16/bfloat16 halve the weights' memory, logits within ~0.1; q8_0 "
                        "and q4 stores compute on their quantized weights (default: %(default)s)")


def add_tensor_arguments(g):
    both = g.add_argument_group("both parallel modes")
    both.add_argument("--device-profile", metavar="TOML",
                      help="per-rank speed, memory_mb and link reliability ([default] and [rank.N] "
                           "tables, see halo_mpi/net/devices.py). Tensor mode places groups by them "
                           "(speeds below 1 are emulated by stretching workers' compute); pipeline "
                           "mode splits layers by speed, counting rank 0's head, within the "
                           "memory budgets (default: equal shares)")
    both.add_argument("--prefill-chunk", type=positive_int, default=64,
                      help="prompt tokens per message during prefill (default: %(default)s)")
    both.add_argument("--rank-timeout", type=positive_float, default=60.0, metavar="S",
                      help="a rank silent for S seconds (no message, no heartbeat: frozen or dead) "
                           "is unreachable: HALO sync re-places its MLP groups and goes on; strict "
                           "sync, pipeline mode, and HALO when it holds attention or head rows end "
                           "with one line naming it and a non-zero exit; it also bounds (at least "
                           "60 s) MPI's start and end, which wait for every rank, a dead one too "
                           "under mpiexec -disable-auto-cleanup (default: %(default)s)")
    t = g.add_argument_group("tensor-parallel mode (--parallel tensor)")
    t.add_argument("--sync", choices=["strict", "halo"], default="halo",
                   help="strict: wait for every partial (the blocking-allreduce baseline); halo: "
                        "wait for critical partials, for the rest only until a deadline "
                        "(default: %(default)s)")
    t.add_argument("--link-loss", metavar="RANK:P,...",
                   help="emulate packet loss P on the link between rank 0 and RANK, both ways, "
                        "with TCP retransmission delays (e.g. 2:0.05,3:0.05)")
    t.add_argument("--loss-model", choices=["tcp", "rto"], default="tcp",
                   help="emulated loss: tcp = fitted to real Linux TCP on the testbed (most losses "
                        "repaired in ms, ~200 ms stalls from lost last segments); rto = one 200 ms "
                        "timeout per lost packet (default: %(default)s)")
    t.add_argument("--unstable-ranks", metavar="R,...",
                   help="ranks on unreliable links: they get the least important groups and are "
                        "not waited for past their deadline (default: the ranks in --link-loss)")
    t.add_argument("--critical-share", type=float, default=0.3,
                   help="halo: partials are waited for until this share of the layer's importance "
                        "has arrived, those of stable ranks always (default: %(default)s)")
    t.add_argument("--deadline-factor", type=float, default=1.5,
                   help="halo: once the critical partials are in, another one is waited for this "
                        "factor times the 90th percentile of how far its link's partials recently "
                        "lagged behind the critical ones, plus --deadline-margin-ms; a partial is "
                        "on time (for re-planning) within the same bound of its link's round trips "
                        "(default: %(default)s)")
    t.add_argument("--deadline-margin-ms", type=float, default=2.0,
                   help="halo: added to every deadline (default: %(default)s)")
    t.add_argument("--backup-share", type=float, default=0.0,
                   help="halo: rank 0 also holds this share (0..1) of each unstable rank's groups, "
                        "the most important ones, and computes them itself when that rank's partial "
                        "misses its deadline; costs rank 0 memory, saves quality (default: %(default)s, "
                        "pure HALO: a missing partial counts as zero)")
    t.add_argument("--placement", choices=["semantic", "static", "random"], default="semantic",
                   help="semantic: least important groups on the least reliable ranks, per-token "
                        "importance from the predictor; static: the same placement, calibration "
                        "averages only; random: groups placed ignoring importance (ablation) "
                        "(default: %(default)s)")
    t.add_argument("--sparsity", type=float, default=0.0,
                   help="skip this share of each layer's groups, the predicted least important, "
                        "in decode steps (contextual sparsity) (default: %(default)s)")
    t.add_argument("--drop-budget", type=float, default=0.01,
                   help="halo: an unstable rank holds at most the least important groups whose "
                        "share of a layer's importance, times how often its link is late (1 - "
                        "reliability), stays within this budget; the rest goes to reliable ranks "
                        "(default: %(default)s)")
    t.add_argument("--wire-dtype", choices=("auto",) + WIRE_DTYPES, default="auto",
                   help="precision of hidden states and partial sums on the wire: float32 is "
                        "exact; float16/bfloat16 halve a message, q8 (int8 blocks of 32 with a "
                        "float16 scale, as GGUF's Q8_0) quarters it, so a 576-wide one fits one "
                        "TCP segment; auto = float32 with --sync strict, float16 with --sync halo "
                        "(default: %(default)s)")
    t.add_argument("--spin-us", type=non_negative_float, default=None,
                   help="wait for a message by testing in a loop this many microseconds before "
                        "sleeping between tests (default: 5000 when every rank has a core of its "
                        "own, 0 when ranks outnumber cores)")
    t.add_argument("--no-replan", action="store_true",
                   help="keep the first placement even when a link's on-time rate changes")




def add_load_arguments(g):
    m = g.add_argument_group("memory budget (every mode)")
    m.add_argument("--mem-budget", metavar="SIZE|PERCENT%",
                   help="the most weight bytes each rank keeps resident: a size (150MB, 1.5GB) or "
                        "a share of its weights (50%%). The least important MLP groups (and, if "
                        "need be, the attention) are streamed from a scratch file every token "
                        "(see --prefetch), a layer at a time. Covers the pinned "
                        "weights, the load buffers, the head slice and norms; not the interpreter, "
                        "torch or the KV cache, reported beside it (default: all resident)")
    m.add_argument("--load-dir", metavar="DIR",
                   help="where the scratch file of streamed weights is written (unnamed, removed "
                        "when the process ends) (default: the store's directory)")
    m.add_argument("--prefetch", choices=["auto", "on", "off"], default="auto",
                   help="on: read the next layers' parts while one computes; off: read each part "
                        "when it is needed; auto: on when reads wait on the disk (--cold-reads) or "
                        "the rank has a core to leave to its reader, off on a one-core rank reading "
                        "from the page cache, where the reader could only take turns with the "
                        "compute (default: %(default)s)")
    m.add_argument("--no-prefetch", dest="prefetch", action="store_const", const="off",
                   help="the same as --prefetch off")
    m.add_argument("--loader", choices=["process", "thread"], default="process",
                   help="who reads ahead: a process of its own (its reads never wait for this "
                        "process's GIL), or a thread here (default: %(default)s)")
    m.add_argument("--read-mbps", type=positive_float, default=None, metavar="MB/S",
                   help="emulate a slow disk: each read of streamed weights takes at least its "
                        "size / MB/S (a Pi's SD card: ~40) (default: the disk's own speed)")
    m.add_argument("--cold-reads", dest="cold", action="store_true",
                   help="read streamed weights with O_DIRECT, past the page cache: they come from "
                        "the disk every time (its DMA fills the buffers, no CPU copy), as on a "
                        "device with no memory to spare for a page cache")


def load_options(a: argparse.Namespace):
    """LoadOptions from the memory-budget options; with --threads 0 a streaming rank leaves a core
    to its reader."""
    from ..loading.parts import LoadOptions  # here: `--help` must not wait for torch
    return options_from(LoadOptions, a, leave_a_core=not a.threads)


def set_threads(threads: int) -> int:
    """torch's thread count for this rank (--threads; 0 = its share of the node's cores)."""
    import torch  # here, not at the top: `halo-mpi --help` must not wait for torch
    n = threads_per_rank(threads)
    torch.set_num_threads(n)
    return n
