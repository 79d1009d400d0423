"""The `halo-mpi` command: one subcommand per task, `--help` on each, errors on one line.

    halo-mpi fetch-weights
    halo-mpi convert weights/SmolLM2-135M-Instruct.Q4_1.gguf -o weights/smollm2-135m.h5
    mpiexec -n 4 halo-mpi generate --parallel tensor --prompt "The capital of France is"

Every error ends the same way: one line `halo-mpi: error: ...` (once per job, even when every
rank finds it) and a non-zero exit; in a multi-rank run, an error or Ctrl-C on one rank ends all
ranks (MPI_Abort) within seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..errors import HaloError
from ..net.launch import (
    CollectiveError,
    abort,
    abort_message,
    guard_finalize,
    peer_died,
    world_rank,
    world_size,
)
from . import bench, evaluate, generate, serve, testbed, weights
from .outputs import check_output


class Parser(argparse.ArgumentParser):
    """argparse with one line per error, printed by rank 0 only (every rank parses the same
    arguments: a usage block from each would repeat the same mistake N times), exit status 2."""

    def error(self, message: str):
        if world_rank() == 0:
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="halo-mpi",
        description="Distributed LLaMA inference for clusters of small devices on lossy networks "
                    "(HALO tensor-parallel mode, MDI-LLM pipeline mode) over MPI.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    weights.add_file_parsers(sub)
    generate.add_parser(sub)
    weights.add_preparation_parsers(sub)
    evaluate.add_parser(sub)
    serve.add_parser(sub)
    bench.add_parser(sub)
    testbed.add_parser(sub)
    return p


def main(argv=None) -> int:
    return leave(run(argv))


def leave(code: int) -> int:
    """The exit code; without MPI_Finalize once a peer has died: its barrier would wait for the
    dead rank for good (measured: survivors of a kill hung there). A rank that dies later, while
    the others are in MPI_Finalize, is the finalize watchdog's (net/launch.py)."""
    if peer_died.is_set():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    guard_finalize()
    return code


def run(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        check_outputs(args)
        args.func(args)
    except CollectiveError as e:          # every rank has it: rank 0 says it once
        if e.rank == 0:
            print(f"halo-mpi: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        return 0
    except (HaloError, KeyboardInterrupt, Exception) as e:
        return fail(e)
    return 0


OUTPUT_FILES = ("stats_json", "json", "report_json")   # options naming a file written at the end


def check_outputs(args: argparse.Namespace):
    """An output file that cannot be written is an error before any work, not after it."""
    for name in OUTPUT_FILES:
        path = getattr(args, name, None)
        if path:
            check_output("--" + name.replace("_", "-"), path)


def fail(error: BaseException) -> int:
    """One line for the error; in a multi-rank run, end every rank with it."""
    if not isinstance(error, (HaloError, KeyboardInterrupt)):
        traceback.print_exc()             # a bug: its traceback is what a report needs
    mpi = sys.modules.get("mpi4py.MPI")
    if world_size() > 1 and mpi is not None:
        return abort(mpi.COMM_WORLD, error)   # prints the line naming this rank, ends the job
    line, code = abort_message(error, world_rank() if world_size() > 1 else None)
    print(line, file=sys.stderr)
    return code
