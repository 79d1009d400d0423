"""One benchmark run, on every rank: the mode layer in-process, launched by the bench.

    mpiexec -n 2 python -m halo_mpi.bench.rank --parallel tensor --sync halo \\
        --task generate --prompt "The history of" --new-tokens 73 --out gen.json

The mode's options are the very flags `generate` takes (options/tree.py declares them once, and
the bench writes them with options/flags.py's `argv`), so a renamed option cannot fall out of step
with the bench. `generate` writes the run's statistics (halo_mpi/stats.py), `evaluate` the
teacher-forced perplexity: {"perplexity", "tokens"}.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..model.jobs import Job
from ..modes.engine import Workload
from ..modes.open import open_engine
from ..net.launch import world_comm
from ..options.flags import add_options, argv, options_of
from ..options.tree import ModeOptions
from ..stats import write_json


@dataclasses.dataclass(frozen=True)
class Task:
    """What a bench run does with the mode it opens."""
    kind: str = "generate"        # generate | evaluate | batch
    prompt: str = ""              # generate: the prompt, greedy, end-of-sequence ignored
    new_tokens: int = 0           # generate: tokens to generate
    eval_tokens: int = 0          # evaluate: held-out tokens to score
    out: str = ""                 # the JSON written by rank 0
    progress: str = ""            # generate: rank 0 appends a line to this file per token made
    batches: str = "1"            # batch: the batch sizes timed (bench/batch.py), comma list
    warmup: int = 4               # batch: untimed steps before each B's
    repeat: int = 1               # batch: rounds taking the batch sizes in turn
    sequences: int = 1            # generate: this many jobs, the i-th prompt "i. prompt" (i > 0);
                                  # evaluate: the text scored as this many parts, batched

    def argv(self) -> list[str]:
        return ["--task", self.kind, "--prompt", self.prompt, "--new-tokens", str(self.new_tokens),
                "--eval-tokens", str(self.eval_tokens), "--out", self.out, "--progress", self.progress,
                "--batches", self.batches, "--warmup", str(self.warmup), "--repeat", str(self.repeat),
                "--sequences", str(self.sequences)]


def command(options: ModeOptions, task: Task) -> list[str]:
    """`python -m mpi4py -m halo_mpi.bench.rank ...` for these options and this task (under
    mpiexec: mpi4py's runner ends every rank when one raises)."""
    return [sys.executable, "-m", "mpi4py", "-m", "halo_mpi.bench.rank", *argv(options), *task.argv()]


def last_line(stderr: str) -> str:
    """A failed run's last line of stderr (its error), for the bench's own one-line error."""
    return (stderr.strip().splitlines() or ["no output"])[-1]


def parse(words: list[str]) -> tuple[ModeOptions, Task]:
    p = argparse.ArgumentParser(prog="halo_mpi.bench.rank")
    add_options(p, ModeOptions)
    p.add_argument("--task", choices=("generate", "evaluate", "batch"), required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--new-tokens", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--progress", default="")
    p.add_argument("--batches", default="1")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--sequences", type=int, default=1)
    a = p.parse_args(words)
    return options_of(ModeOptions, a), Task(a.task, a.prompt, a.new_tokens, a.eval_tokens, a.out,
                                            a.progress, a.batches, a.warmup, a.repeat, a.sequences)


def progress_writer(path: str):
    """on_token for a Job: one line per token to `path` (the bench reads how far the job is)."""
    if not path:
        return None
    f = open(path, "a", buffering=1)          # line-buffered: each token is in the file at once

    def on_token(token: int) -> bool:
        f.write(f"{token}\n")
        return False
    return on_token


def workload(task: Task):
    def prepare(tok, context: int) -> Workload:
        if task.kind == "generate":
            # every sequence its own prompt (a batch of one repeated prompt would be no test)
            prompts = [task.prompt] + [f"{i}. {task.prompt}" for i in range(1, task.sequences)]
            return Workload(jobs=[Job(tok.encode(prompt), task.new_tokens, index=i,
                                      on_token=progress_writer(task.progress) if i == 0 else None)
                                  for i, prompt in enumerate(prompts)])
        from ..model.texts import evaluation_text
        return Workload(score=tok.encode(evaluation_text())[: task.eval_tokens + 1])
    return prepare


def run(options: ModeOptions, task: Task, comm=None):
    from ..model.evaluate import perplexity
    with open_engine(options, comm, workload(task)) as engine:
        if task.kind == "batch":
            return time_batches(engine, task)
        if task.kind == "generate":
            engine.generate()
        else:
            nll = engine.perplexity(sequences=task.sequences)
        report = engine.report()
    if report is None:
        return
    if task.kind == "generate":
        report.stats.write(task.out)
    else:
        write_json(task.out, {"perplexity": perplexity(nll), "tokens": len(nll)})
    if report.error is not None:
        raise report.error


def time_batches(engine, task: Task):
    """Rank 0 times decode steps over each batch size (bench/batch.py) and writes B -> seconds."""
    from .batch import measure_batches
    batches = [int(b) for b in task.batches.split(",")]
    times = engine.call(lambda: measure_batches(engine.batch_model(), batches, task.new_tokens,
                                                task.warmup, task.repeat))
    if times is not None:
        write_json(task.out, times)


def main(words: list[str] | None = None):
    options, task = parse(sys.argv[1:] if words is None else words)
    comm = world_comm(options.rank_timeout) if options.parallel != "none" else None
    run(options, task, comm)


if __name__ == "__main__":
    main()
