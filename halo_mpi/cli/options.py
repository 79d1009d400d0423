"""What the subcommands share: the mode options on a parser, and opening a mode under MPI.

The options themselves are declared once, in halo_mpi/options/tree.py; `add_mode_options` puts
them on a subcommand's parser and `mode_options` reads them back, typed. The number parsers
below serve the options a single command declares itself (--max-new-tokens, --port, ...).
"""
from __future__ import annotations

import argparse

from ..net.launch import CollectiveError, world_rank, world_size
from ..options import values
from ..options.flags import add_options, options_of
from ..options.tree import DEFAULT_WEIGHTS, ModeOptions, check  # noqa: F401  (DEFAULT_WEIGHTS: for cli/weights.py)


def _argparse_type(parse):
    """A parser of options/values.py as argparse's type (its error on argparse's one line)."""
    def typed(s: str):
        try:
            return parse(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    typed.__name__ = parse.__name__
    return typed


positive_int = _argparse_type(values.positive_int)
non_negative_int = _argparse_type(values.non_negative_int)
non_negative_float = _argparse_type(values.non_negative_float)
positive_float = _argparse_type(values.positive_float)
rto_min_ms = _argparse_type(values.rto_min_ms)
top_p = _argparse_type(values.in_range(0, 1, lo_open=True))


def add_mode_options(p, only: set[str] | None = None):
    """Every mode option (or the dotted paths in `only`) on a subcommand's parser."""
    add_options(p, ModeOptions, only)


def mode_options(a: argparse.Namespace, **fields) -> ModeOptions:
    """The typed options from what argparse parsed (fields: values a command fixes itself)."""
    from dataclasses import replace
    return replace(options_of(ModeOptions, a), **fields)


def open_mode(options: ModeOptions, prepare=None, log=None):
    """The engine of the chosen mode on this rank (halo_mpi/modes/). The rules that span options
    are checked before MPI starts: every rank finds the same mistake and rank 0 says it once."""
    from ..errors import HaloError
    try:
        check(options, world_size())
    except HaloError as e:
        raise CollectiveError(str(e), world_rank()) from None
    from ..modes.open import open_engine
    comm = None
    if options.parallel != "none":
        from ..net.launch import world_comm
        comm = world_comm(options.rank_timeout)
    return open_engine(options, comm, prepare, log)


def add_weights_argument(p):
    """--weights, as every mode declares it (for the commands that take only a store)."""
    add_mode_options(p, {"weights"})


def add_threads_argument(p):
    add_mode_options(p, {"threads"})


def set_threads(threads: int) -> int:
    from ..modes.open import set_threads as set_torch_threads  # here: `--help` must not wait for torch
    return set_torch_threads(threads)
