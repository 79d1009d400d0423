"""MPI world helpers shared by the parallel modes: collective startup checks and aborting.

`comm` is always passed in (never bound at import), so the single-process twin can stand in.
"""
from __future__ import annotations

import sys

from .errors import HaloError


class CollectiveError(HaloError):
    """An error every rank knows about; only rank 0 prints it."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


def collective(comm, fn):
    """Run fn on every rank; if it fails anywhere, every rank raises the same CollectiveError.

    Startup work (opening files, checking options) goes through here, so a bad input anywhere
    ends all ranks with one clear line instead of leaving the healthy ranks waiting forever.
    """
    result, error = None, None
    try:
        result = fn()
    except HaloError as e:
        error = str(e)
    errors = comm.allgather(error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        messages = sorted({e for _, e in failed})
        if len(messages) == 1 and len(failed) == comm.Get_size():
            text = messages[0]
        else:
            text = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise CollectiveError(text, comm.Get_rank())
    return result


def abort_world(comm, code: int, message: str | None = None):
    """End every rank now: an error on one rank must not leave the others hanging."""
    if message:
        print(f"halo-mpi: error: [rank {comm.Get_rank()}] {message}", file=sys.stderr, flush=True)
    comm.Abort(code)
