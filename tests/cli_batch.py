"""Runs many `halo-mpi` command lines in one process (a fresh interpreter per line costs ~3 s on
two cores): reads a JSON list of argument lists on stdin, writes a JSON list of
{"code", "stdout", "stderr"} on stdout, each as `halo-mpi ARGS` would have exited and printed.

    echo '[["info", "--weights", "missing.h5"]]' | python tests/cli_batch.py
"""
import contextlib
import io
import json
import sys

from halo_mpi.cli.main import run


def one(argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run(argv)
        except SystemExit as e:                # argparse's errors, and a command's own exit
            code = e.code if isinstance(e.code, int) else 1
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    results = [one(argv) for argv in json.load(sys.stdin)]
    json.dump(results, sys.__stdout__)
