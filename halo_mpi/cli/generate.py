"""`halo-mpi generate`: one process, tensor-parallel (HALO) or pipeline (MDI-LLM).

    halo-mpi generate --prompt "The capital of France is" --temperature 0
    mpiexec -n 4 halo-mpi generate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05 --prompt ...
    mpiexec -n 4 halo-mpi generate --parallel pipeline --num-sequences 8 --prompt-file prompts.txt

The mode layer (halo_mpi/modes/) opens the mode and runs the model; this module turns the prompts
into jobs, prints the tokens and writes the statistics (halo_mpi/stats.py). Engine modules are
imported inside the command, so that `--help` and argument errors answer before torch and MPI
are loaded.
"""
from __future__ import annotations

import sys

from .options import add_mode_options, mode_options, non_negative_float, open_mode, positive_int, top_p
from .prompts import Output


def add_parser(sub):
    g = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate text, streaming tokens as they are made; prints "
                                   "prefill time, ms/token and tokens/s at the end (on stderr).")
    g.add_argument("--prompt", action="append",
                   help="a prompt; repeat for several sequences (pipeline mode runs them together)")
    g.add_argument("--prompt-file",
                   help="read prompts from this file instead, one per line (write \\n for a newline)")
    g.add_argument("--stats-json", help="write run statistics (per rank) to this JSON file")
    g.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="tokens to generate at most (default: %(default)s)")
    g.add_argument("--temperature", type=non_negative_float, default=0.7,
                   help="sampling temperature; 0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=top_p, default=0.9,
                   help="nucleus sampling: keep the most likely tokens up to this probability "
                        "(default: %(default)s)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn in the model's ChatML format")
    g.add_argument("--system", default=None,
                   help="system message for --chat (default: the model's own)")
    g.add_argument("--quiet", action="store_true",
                   help="print only the generated text at the end, no streaming")
    g.add_argument("--progress", type=non_negative_float, default=0.0, metavar="SECONDS",
                   help="every SECONDS, one line on stderr: tokens so far, tokens/s, and in tensor "
                        "mode each link's on-time rate (default: 0 = off)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-new-tokens tokens (for benchmarks)")
    add_mode_options(g)
    g.set_defaults(func=run)


def run(a):
    from ..modes.engine import Workload
    options = mode_options(a)
    out = Output(a, options)
    # while tokens stream to the terminal a log line would land inside the text: then the
    # re-plans are told in the report at the end (which lists them anyway)
    live = (lambda line: print(line, file=sys.stderr)) if a.quiet else None
    with open_mode(options, lambda tok, context: Workload(jobs=out.jobs(tok, context)), live) as engine:
        out.progress.links = lambda: {r: link.on_time_rate
                                      for r, link in getattr(engine, "links", {}).items()}
        engine.generate(on_finish=out.finished)
        report = engine.report()
    if report is None:
        return
    print("\n".join(report.lines), file=sys.stderr)
    if a.stats_json:
        report.stats.write(a.stats_json)
    if report.error is not None:
        raise report.error
