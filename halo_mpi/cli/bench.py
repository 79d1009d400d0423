"""`halo-mpi bench`: the modes under packet loss, single-process decode speed, or the loss emulation's fit.

    halo-mpi bench --ranks 4 --modes single,strict,halo --loss 0,0.01,0.05 --out results
    halo-mpi bench --decode --dtypes float32,float16 --profile
    halo-mpi bench --calibrate-emulation --loss 0.01,0.03,0.05      # root, on the testbed
    halo-mpi bench --budgets 100%,50%:prefetch,50%:no-prefetch --budget-ranks 1,2
    halo-mpi bench --scenario changing-loss --net testbed --ranks 3 --lossy-ranks 2 --phases 0,0.1,0.3,0
    halo-mpi bench --batch 1,2,4,8 --store-dtypes float32,q4 --out results
    halo-mpi bench --batch 1,4,8 --batch-modes single,strict,halo --threads 1 --store-dtypes float32,q4
    halo-mpi bench --batch 1,2,4 --batch-modes pipeline --batch-ranks 2     # the ring under mpiexec
"""
from __future__ import annotations

import os
import sys

from ..bench.loss import MODES
from ..errors import HaloError
from ..net.ranks import parse_floats, parse_ranks
from ..stats import write_json
from ..store.hdf5 import STORE_DTYPES
from ..testbed.netns import tool
from .options import (
    add_mode_options,
    mode_options,
    non_negative_int,
    positive_float,
    positive_int,
    rto_min_ms,
    set_threads,
)

BENCH_MODE_OPTIONS = {"weights", "dtype", "threads", "tensor.wire_dtype", "load.read_mbps", "load.cold"}


def add_parser(sub):
    b = sub.add_parser("bench", help="benchmark the modes under packet loss (or decode speed)",
                       description="Run each mode at each loss rate (one mpiexec per run): median "
                                   "and p95 ms/token, teacher-forced perplexity on held-out text, "
                                   "greedy agreement with the reference, dropped importance share "
                                   "and peak RSS per rank; writes results.json, results.md and "
                                   "results.png to --out. With --decode: single-process decode "
                                   "speed per dtype instead (--profile: where the time goes).")
    add_mode_options(b, BENCH_MODE_OPTIONS)      # declared once, with generate's (options/tree.py)
    b.add_argument("--tokens", type=positive_int, default=64,
                   help="timed decode tokens per run (default: %(default)s)")
    b.add_argument("--warmup", type=non_negative_int, default=8,
                   help="untimed decode tokens first (default: %(default)s)")
    b.add_argument("--eval-tokens", type=positive_int, default=128,
                   help="held-out tokens for perplexity (default: %(default)s)")
    b.add_argument("--out", default="results", help="output folder (default: %(default)s)")
    b.add_argument("--json", help="with --decode, --batch or --attention-drop: also write the rows to "
                                  "this JSON file")
    add_loss_arguments(b)
    add_decode_arguments(b)
    add_budget_arguments(b)
    add_scenario_arguments(b)
    b.set_defaults(func=run)


def add_loss_arguments(b):
    m = b.add_argument_group("the modes under packet loss (the default)")
    m.add_argument("--ranks", type=positive_int, default=4,
                   help="ranks of the distributed modes (default: %(default)s)")
    m.add_argument("--modes", default="single,strict,halo,halo-random",
                   help="comma list among single, strict, halo, halo-pure (--backup-share 0), "
                        "halo-static, halo-random, halo-backup (--backup-share 1), halo-backup-half "
                        "(--backup-share 0.5), pipeline (default: %(default)s)")
    m.add_argument("--loss", default="0,0.01,0.03,0.05",
                   help="comma list of packet loss rates for the lossy ranks (default: %(default)s)")
    m.add_argument("--lossy-ranks", help="comma list (default: the upper half of the ranks, e.g. 2,3 of 4)")
    m.add_argument("--net", choices=["emulated", "testbed"],
                   help="testbed: real kernel packet loss in network namespaces (root); emulated: "
                        "the transport's loss model (default: testbed when root with iptables, else "
                        "emulated)")
    m.add_argument("--rto-min", type=rto_min_ms, default=None, metavar="MS",
                   help="with --net testbed: TCP's minimum retransmission timeout on the ranks' routes "
                        "in ms (Linux's default 200; see `halo-mpi testbed up --rto-min`)")
    m.add_argument("--calibrate-emulation", action="store_true",
                   help="instead: measure message delays on the testbed (root) at each --loss, fit "
                        "the emulated loss model to them and compare both distributions")
    m.add_argument("--count", type=positive_int, default=1000,
                   help="with --calibrate-emulation: round trips per size and loss (default: %(default)s)")
    m.add_argument("--attention-drop", metavar="RATES",
                   help="instead: held-out perplexity (one process, --eval-tokens) with each attention "
                        "group's output lost at each rate in this comma list, then each MLP group's "
                        "(why HALO sync always waits for attention partials)")


def add_decode_arguments(b):
    d = b.add_argument_group("single-process decode speed (--decode)")
    d.add_argument("--decode", action="store_true", help="single-process decode speed per dtype instead")
    d.add_argument("--dtypes", default="float32,float16",
                   help="with --decode: comma list of compute dtypes for float32 stores "
                        "(default: %(default)s)")
    d.add_argument("--store-dtypes", default=None,
                   help="with --decode: comma list among float32, q8_0, q4; each is --weights when it "
                        "has that dtype, else <stem>-<dtype>.h5 beside it (default: --weights only)")
    d.add_argument("--profile", action="store_true", help="with --decode: profile one decode step")
    d.add_argument("--batch", metavar="LIST",
                   help="instead: batched decode, a step over B sequences for each B of this comma "
                        "list (1,2,4,8): ms/step, tokens/s in total and per-sequence ms/token, per "
                        "--store-dtypes and --batch-modes, --repeat rounds taking the B in turn; "
                        "writes batch.png to --out")
    d.add_argument("--batch-modes", default="single",
                   help="with --batch: comma list among single (one process), strict and halo "
                        "(tensor mode on --batch-ranks ranks, one mpiexec per mode and store dtype) "
                        "and pipeline (the ring under mpiexec -n --batch-ranks, ranks x B sequences "
                        "in flight, --max-batch B); under mpiexec --threads threads per rank "
                        "(default: %(default)s)")
    d.add_argument("--batch-ranks", type=positive_int, default=2,
                   help="with --batch: ranks of the tensor and pipeline runs, sharing this machine's "
                        "cores (default: %(default)s)")


def add_budget_arguments(b):
    m = b.add_argument_group("memory budgets (--budgets)")
    m.add_argument("--budgets", metavar="LIST",
                   help="instead: decode speed and memory at each budget of this comma list (100%%, "
                        "50%%, 150MB; BUDGET:prefetch and BUDGET:no-prefetch force --prefetch on or "
                        "off, else auto), one generate per budget and --budget-ranks value, in "
                        "--repeat interleaved rounds (--read-mbps and --cold-reads apply)")
    m.add_argument("--budget-ranks", default="1,2",
                   help="with --budgets: comma list of rank counts; 1 = one process, more = strict "
                        "tensor mode (default: %(default)s)")
    m.add_argument("--repeat", type=positive_int, default=3,
                   help="with --budgets or --batch: rounds; each row shows the median (default: %(default)s)")


SCENARIO_MODE_OPTIONS = {"tensor.sync", "tensor.unstable_ranks", "tensor.loss_model"}


def add_scenario_arguments(b):
    m = b.add_argument_group("a link that changes during one run (--scenario)")
    m.add_argument("--scenario", choices=["changing-loss"],
                   help="instead: one tensor-parallel generation of --tokens while the loss of "
                        "--lossy-ranks (default: the last rank) goes through --phases on --net; "
                        "writes changing-loss.json (per token: ms, dropped share, each rank's share "
                        "of the MLP groups) and changing-loss.png to --out, and prints the max "
                        "ms/token, the median per phase and the tokens until ms/token is back within "
                        "1.2x of the loss-free phase after the loss ends")
    m.add_argument("--phases", default="0,0.1,0.3,0",
                   help="with --scenario: comma list of the lossy ranks' drop probability in each "
                        "phase (default: %(default)s)")
    m.add_argument("--phase-tokens", default=None, metavar="N[,N...]",
                   help="with --scenario: decode tokens of each phase, one number for all or one "
                        "per phase (default: --tokens split evenly)")
    m.add_argument("--timeout", type=positive_float, default=1800.0, metavar="S",
                   help="with --scenario: stop the run after S seconds and say how far it got "
                        "(default: %(default)s)")
    add_mode_options(b, SCENARIO_MODE_OPTIONS)


def bench_scenario(a):
    from ..bench.changing_loss import ChangingLoss, run_scenario
    phases = parse_floats(a.phases, "--phases")
    lengths = ([int(n) for n in parse_floats(a.phase_tokens, "--phase-tokens")] if a.phase_tokens
               else [a.tokens // max(len(phases), 1)])
    if len(lengths) == 1:
        lengths = lengths * len(phases)
    if not all(n > 0 for n in lengths):
        raise HaloError(f"--phase-tokens {a.phase_tokens or a.tokens}: each phase has at least one token")
    lossy = (sorted(parse_ranks(a.lossy_ranks, "--lossy-ranks", range(1, a.ranks))) if a.lossy_ranks
             else [a.ranks - 1])
    cfg = ChangingLoss(mode_options(a), a.ranks, lossy, phases, lengths, a.net or default_net(), a.out,
                       a.warmup, a.timeout, a.rto_min)
    if a.rto_min is not None and cfg.net != "testbed":
        raise HaloError("--rto-min sets real TCP's timeout on the testbed's routes: "
                        "use it with --net testbed")
    result = run_scenario(cfg)
    print(f"wrote {a.out}/changing-loss.json, changing-loss.png")
    if result["stopped"]:
        raise HaloError(f"{result['stopped']}; the figures above are of the tokens it made, timed "
                        f"by the bench")


def run(a):
    if a.scenario:
        return bench_scenario(a)
    if a.budgets:
        return bench_budgets(a)
    if a.batch:
        return bench_batch(a)
    if a.decode:
        return bench_decode(a)
    if a.attention_drop:
        return bench_attention_drop(a)
    if a.calibrate_emulation:
        return calibrate_emulation(a)
    from ..bench.loss import BenchConfig, run_bench, write_results
    modes = [m for m in a.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise HaloError(f"unknown bench modes {unknown}; choose from {', '.join(MODES)}")
    losses = parse_floats(a.loss, "--loss")
    if a.ranks < 2 and set(modes) - {"single"}:
        raise HaloError("--ranks must be at least 2 for the distributed modes")
    lossy = (sorted(parse_ranks(a.lossy_ranks, "--lossy-ranks", range(1, a.ranks))) if a.lossy_ranks
             else list(range(max(1, a.ranks // 2), a.ranks)))
    cfg = BenchConfig(mode_options(a), a.ranks, modes, losses, lossy, a.tokens, a.warmup, a.eval_tokens,
                      a.net or default_net(), a.out, rto_min_ms=a.rto_min)
    if a.rto_min is not None and cfg.net != "testbed":
        raise HaloError("--rto-min sets real TCP's timeout on the testbed's routes: "
                        "use it with --net testbed")
    results = run_bench(cfg)
    command = "halo-mpi " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "halo-mpi bench"
    plotted = write_results(results, a.out, command)
    print(f"wrote {a.out}/results.json, results.md"
          f"{', results.png' if plotted else ' (no plot: pip install matplotlib)'}")


def bench_budgets(a):
    from ..bench.budget import BudgetBench, format_rows, parse_budget_spec, run_budget_bench
    budgets = [b for b in a.budgets.split(",") if b]
    for spec in budgets:
        parse_budget_spec(spec)
    ranks = sorted(int(r) for r in parse_floats(a.budget_ranks, "--budget-ranks"))
    rows = run_budget_bench(BudgetBench(mode_options(a), budgets, ranks, a.tokens, a.warmup, a.repeat))
    print(f"{a.weights}, {a.tokens} timed tokens after {a.warmup}, {a.repeat} rounds")
    print(format_rows(rows))
    if a.json:
        write_json(a.json, rows)


def bench_attention_drop(a):
    import torch

    from ..bench.attention_drop import attention_drop
    from ..model.evaluate import perplexity, teacher_forced_nll
    from ..model.generate import LocalSession
    from ..model.llama import Transformer
    from ..model.texts import evaluation_text
    from ..model.tokenizer import Tokenizer
    from ..store.hdf5 import Store
    rates = parse_floats(a.attention_drop, "--attention-drop")
    if not rates or not all(0.0 <= p <= 1.0 for p in rates):
        raise HaloError(f"--attention-drop {a.attention_drop!r}: give rates in [0, 1]")
    with Store(a.weights) as store:
        ids = Tokenizer.from_store(store).encode(evaluation_text())[: a.eval_tokens + 1]
        with torch.inference_mode():
            base = perplexity(teacher_forced_nll(LocalSession(Transformer.from_store(store), len(ids)), ids))
        print(f"no loss: perplexity {base:.3f} over {len(ids) - 1} held-out tokens")
        rows = attention_drop(store, ids, rates, progress=lambda r: print(
            f"{r['part']:9s} groups lost at {r['rate']:g}: perplexity {r['perplexity']:.3f} "
            f"({100 * (r['perplexity'] / base - 1):+.1f}%), {r['groups_lost']} group outputs lost"))
    if a.json:
        write_json(a.json, {"baseline": base, "tokens": len(ids) - 1, "rows": rows})


def bench_batch(a):
    from ..bench.batch import BatchBench, bench_batches, plot_batches
    set_threads(a.threads)
    batches = [int(b) for b in parse_floats(a.batch, "--batch")]
    if not batches or min(batches) < 1:
        raise HaloError(f"--batch {a.batch!r}: give sequence counts of 1 or more, e.g. 1,2,4,8")
    modes = tuple(a.batch_modes.split(","))
    unknown = sorted(set(modes) - {"single", "strict", "halo", "pipeline"})
    if unknown:
        raise HaloError(f"--batch-modes: unknown {', '.join(unknown)}; choose among single, strict, "
                        f"halo, pipeline")
    if a.batch_ranks < 2 and set(modes) - {"single"}:
        raise HaloError(f"--batch-ranks {a.batch_ranks}: tensor and pipeline runs need 2 ranks or more")
    rows = bench_batches(BatchBench(a.weights, batches, a.tokens, a.warmup, a.repeat, store_dtypes_of(a),
                                    modes, a.batch_ranks, a.threads))
    os.makedirs(a.out, exist_ok=True)
    plotted = plot_batches(rows, os.path.join(a.out, "batch.png"))
    print(f"wrote {a.out}/batch.png" if plotted else "no plot: pip install matplotlib")
    if a.json:
        write_json(a.json, rows)


def store_dtypes_of(a) -> list[str] | None:
    store_dtypes = a.store_dtypes.split(",") if a.store_dtypes else None
    unknown = sorted(set(store_dtypes or []) - set(STORE_DTYPES))
    if unknown:
        raise HaloError(f"--store-dtypes: unknown {', '.join(unknown)}; "
                        f"choose among {', '.join(STORE_DTYPES)}")
    return store_dtypes


def bench_decode(a):
    from ..bench.decode import bench_single
    set_threads(a.threads)
    store_dtypes = store_dtypes_of(a)
    rows = bench_single(a.weights, a.dtypes.split(","), a.tokens, a.warmup, a.profile, store_dtypes,
                        a.eval_tokens if store_dtypes else 0)
    if a.json:
        write_json(a.json, rows)


def calibrate_emulation(a):
    from ..bench.emulation import calibrate_emulation
    r = calibrate_emulation(parse_floats(a.loss, "--loss"), a.out, a.count)
    ok = sum(x["within_2x"] for x in r["rows"])
    print(f"fitted {r['fitted_params']}; p95 and p99 within 2x in {ok} of {len(r['rows'])} "
          f"cells; wrote {a.out}/results.json, results.md")


def default_net() -> str:
    """The real testbed when it can run here (root and iptables), else the emulated loss."""
    try:
        tool("iptables")
    except HaloError:
        return "emulated"
    return "testbed" if os.geteuid() == 0 else "emulated"
