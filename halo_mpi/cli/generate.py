"""`halo-mpi generate`: one process, tensor-parallel (HALO) or pipeline (MDI-LLM).

    halo-mpi generate --prompt "The capital of France is" --temperature 0
    mpiexec -n 4 halo-mpi generate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05 --prompt ...
    mpiexec -n 4 halo-mpi generate --parallel pipeline --num-sequences 8 --prompt-file prompts.txt

The engines (tensor/, pipeline/) run the model; this module reads the prompts, prints the tokens
and writes the statistics (halo_mpi/stats.py). Engine modules are imported inside the commands,
so that `--help` and argument errors answer before torch and MPI are loaded.
"""
from __future__ import annotations

import sys

from ..net.launch import CollectiveError, world_rank, world_size
from ..stats import RankStats, RunStats, SequenceStats, cpu_seconds, peak_rss_mb
from .options import (
    add_dtype_argument,
    add_load_arguments,
    add_tensor_arguments,
    add_threads_argument,
    add_weights_argument,
    load_options,
    non_negative_float,
    options_from,
    positive_int,
    set_threads,
    top_p,
)
from .prompts import TokenPrinter, encode_prompt, read_prompts, stop_ids


def add_parser(sub):
    g = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate text, streaming tokens as they are made; prints "
                                   "prefill time, ms/token and tokens/s at the end (on stderr).")
    add_weights_argument(g)
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
    g.add_argument("--temperature", type=non_negative_float, default=0.7,
                   help="sampling temperature; 0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=top_p, default=0.9,
                   help="nucleus sampling: keep the most likely tokens up to this probability "
                        "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="sampling seed, also of the loss emulation (default: %(default)s)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn in the model's ChatML format")
    g.add_argument("--system", default=None,
                   help="system message for --chat (default: the model's own)")
    add_dtype_argument(g)
    add_threads_argument(g)
    g.add_argument("--quiet", action="store_true",
                   help="print only the generated text at the end, no streaming")
    g.add_argument("--progress", type=non_negative_float, default=0.0, metavar="SECONDS",
                   help="every SECONDS, one line on stderr: tokens so far, tokens/s, and in tensor "
                        "mode each link's on-time rate (default: 0 = off)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-new-tokens tokens (for benchmarks)")
    add_tensor_arguments(g)
    add_load_arguments(g)
    g.set_defaults(func=run)


def run(a):
    set_threads(a.threads)
    if a.parallel == "tensor":
        return generate_tensor(a)
    if a.parallel == "pipeline":
        return generate_pipeline(a)
    if world_size() > 1:
        raise CollectiveError(f"this run has {world_size()} MPI ranks; choose --parallel tensor or "
                              f"--parallel pipeline, or launch with -n 1", world_rank())   # said once
    return generate_single(a)


class Progress:
    """`--progress SECONDS`: a line on stderr every SECONDS while tokens come; `links()` gives
    rank -> on-time rate (tensor mode) or nothing."""

    def __init__(self, every_s: float, links=lambda: {}):
        import time
        self.every_s, self.links, self.clock = every_s, links, time.perf_counter
        self.start = self.last = self.clock()
        self.tokens = 0

    def __call__(self, token: int):
        self.tokens += 1
        now = self.clock()
        if self.every_s and now - self.last >= self.every_s:
            self.last = now
            rates = " ".join(f"{r}:{v:.2f}" for r, v in sorted(self.links().items()))
            print(f"progress: {self.tokens} tokens, {self.tokens / (now - self.start):.1f} tokens/s"
                  + (f", on-time rank:rate {rates}" if rates else ""), file=sys.stderr, flush=True)


def generate_each(a, tok, prompts: list[str], encoded: list, session_for, links=lambda: {}) -> list:
    """Each prompt in turn through `session_for(max_len)`, its tokens streamed as they come."""
    import torch

    from ..model.generate import Sampler, generate
    results = []
    progress = Progress(getattr(a, "progress", 0.0), links)
    for index, (prompt, (ids, max_new)) in enumerate(zip(prompts, encoded)):
        printer = TokenPrinter(tok, prompt if not a.chat else "", a.quiet,
                               label=f"[{index}] " if len(prompts) > 1 else "")

        def on_token(token: int, printer=printer):
            printer(token)
            progress(token)
        with torch.inference_mode():
            result = generate(session_for(len(ids) + max_new), ids, max_new,
                              Sampler(a.temperature, a.top_p, a.seed), stop_ids(tok, a), on_token)
        printer.close(result.tokens)
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------
# one process

def generate_single(a):
    import time

    from ..loading.parts import budgeted_transformer, describe_loading
    from ..model.generate import LocalSession
    from ..model.llama import Transformer
    from ..model.tokenizer import Tokenizer
    from ..store.hdf5 import Store

    prompts = read_prompts(a)
    load = load_options(a)
    with Store(a.weights) as store:        # open to the end: a budgeted run reads from it
        tok = Tokenizer.from_store(store)
        encoded = [encode_prompt(tok, p, a, store.args.max_seq_len) for p in prompts]
        weights = None
        if load.mem_budget:
            model, weights = budgeted_transformer(store, load, a.dtype)
            print(f"memory: {weights.describe()}", file=sys.stderr)
        else:
            model = Transformer.from_store(store, dtype=a.dtype)
        t0 = time.perf_counter()
        try:
            results = generate_each(a, tok, prompts, encoded, lambda max_len: LocalSession(model, max_len))
        finally:
            loading = weights.stats() if weights else None
            if weights:
                weights.close()
    for result in results:
        print(result.summary(), file=sys.stderr)
    resident = loading["resident_bytes"] if loading else model.weight_bytes()
    print(f"weights {resident / 1e6:.1f} MB resident, peak RSS {peak_rss_mb():.0f} MB", file=sys.stderr)
    tokens = sum(len(r.tokens) for r in results)
    if loading:
        print(describe_loading(loading, tokens), file=sys.stderr)
    if a.stats_json:
        decode_s = [s for r in results for s in r.decode_s]
        RunStats("single", 1, a.dtype, [SequenceStats.of(i, r) for i, r in enumerate(results)],
                 [RankStats(0, peak_rss_mb(), cpu_seconds(), weight_bytes=resident,
                            extra={"loading": loading} if loading else {})],
                 len(decode_s) / sum(decode_s) if decode_s else float("nan"),
                 time.perf_counter() - t0).write(a.stats_json)


# ---------------------------------------------------------------------------------------------
# tensor-parallel mode

def generate_tensor(a):
    from ..model.tokenizer import Tokenizer
    from ..net.launch import collective, world_comm
    from ..tensor.coordinator import TensorParallelSession
    from ..tensor.run import (
        TensorOptions,
        describe,
        end_if_silent,
        format_report,
        open_and_plan,
        run_tensor,
        tensor_stats,
    )

    comm = world_comm(a.rank_timeout)
    rank, size = comm.Get_rank(), comm.Get_size()
    options = options_from(TensorOptions, a, load=load_options(a))

    def setup():
        store, plan = open_and_plan(a.weights, rank, size, options)
        prompts = encoded = tok = None
        if rank == 0:
            tok = Tokenizer.from_store(store)
            prompts = read_prompts(a)
            encoded = [encode_prompt(tok, p, a, store.args.max_seq_len) for p in prompts]
        return store, plan, tok, prompts, encoded

    store, plan, tok, prompts, encoded = collective(comm, setup)
    if rank == 0:
        print(describe(plan, store), file=sys.stderr)

    def drive(coordinator, model):
        links = lambda: {r: link.on_time_rate for r, link in coordinator.links.items()}  # noqa: E731
        return generate_each(a, tok, prompts, encoded, lambda max_len: TensorParallelSession(
            model, coordinator, max_len, options.prefill_chunk), links)

    # while tokens stream to the terminal a log line would land inside the text: then the
    # re-plans are told in the report at the end (which lists them anyway)
    live = (lambda line: print(line, file=sys.stderr)) if a.quiet else None
    run = run_tensor(comm, store, plan, drive, log=live)
    store.close()
    if rank == 0:
        stats = tensor_stats(plan, run, run.result)
        print(format_report(stats), file=sys.stderr)
        if a.stats_json:
            stats.write(a.stats_json)
        end_if_silent(run)


# ---------------------------------------------------------------------------------------------
# pipeline mode

def generate_pipeline(a):
    """`mpiexec -n N halo-mpi generate --parallel pipeline ...` on every rank."""
    from ..net.devices import read_device_profile
    from ..net.launch import world_comm
    from ..pipeline.ring import Options, Request
    from ..pipeline.run import collectively, run_pipeline

    comm = world_comm(a.rank_timeout)
    rank, size = comm.Get_rank(), comm.Get_size()
    prompts, requests, tok = collectively(comm, (lambda: read_requests(a)) if rank == 0
                                          else lambda: (None,) * 3)
    devices = collectively(comm, lambda: read_device_profile(a.device_profile, size).ranks
                           if rank == 0 and a.device_profile else None)
    options = options_from(Options, a, in_flight=a.num_sequences or 0, load=load_options(a),
                           stop_ids=frozenset(stop_ids(tok, a)) if tok else frozenset())
    run = run_pipeline(comm, a.weights, requests and [Request(ids, n) for ids, n in requests], options,
                       devices, on_finish=sequence_printer(tok, prompts, a) if rank == 0 else None)
    if run is None:
        return
    print("\n".join(run.summary_lines()), file=sys.stderr)
    if a.stats_json:
        run.stats().write(a.stats_json)


def read_requests(a) -> tuple[list[str], list[tuple[list[int], int]], object]:
    """Rank 0's input: prompts, their token ids and budgets, the tokenizer."""
    from ..model.tokenizer import Tokenizer
    from ..store.hdf5 import Store
    prompts = read_prompts(a)
    with Store(a.weights) as store:
        tok = Tokenizer.from_store(store)
        encoded = [encode_prompt(tok, p, a, store.args.max_seq_len) for p in prompts]
    if a.num_sequences and a.num_sequences > len(prompts):
        print(f"note: --num-sequences {a.num_sequences} capped to the {len(prompts)} prompts given",
              file=sys.stderr)
    return prompts, encoded, tok


def sequence_printer(tok, prompts: list[str], a):
    """Each sequence's text on its own, labelled by its prompt's index, as soon as it finishes."""
    def print_sequence(seq):
        prefix = "" if a.chat or a.quiet else prompts[seq.index]
        print(f"[{seq.index}] {prefix}{tok.decode(seq.result.tokens)}", flush=True)
    return print_sequence
