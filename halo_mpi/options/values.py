"""Typed option values and their parsers: each checks its range where it is parsed, with a
one-line error, and has a formatter that its parser takes back (options/flags.py's `argv`).

    Budget.parse("50%")                               -> Budget(share=0.5)
    rank_values("--link-loss")("2:0.05,3:0.05")       -> {2: 0.05, 3: 0.05}
    link_losses("--link-loss")("2:0@0,2:0.1@50")      -> {2: ((0, 0.0), (50, 0.1))}
    rank_set("--unstable-ranks")("2,3")               -> frozenset({2, 3})
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import HaloError
from ..net.ranks import parse_rank_schedule, parse_rank_values, parse_ranks, parse_slowdowns

# ---------------------------------------------------------------------------------------------
# numbers


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise ValueError(f"must be >= 1, got {v}")
    return v


def non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise ValueError(f"must be >= 0, got {v}")
    return v


def non_negative_float(s: str) -> float:
    v = float(s)
    if not 0 <= v < float("inf"):
        raise ValueError(f"must be a finite number >= 0, got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not 0 < v < float("inf"):
        raise ValueError(f"must be > 0, got {s}")
    return v


def rto_min_ms(s: str) -> float:
    """TCP's minimum retransmission timeout, ms: Linux takes (0, 200] (200 is its default)."""
    v = float(s)
    if not 0 < v <= 200:
        raise ValueError(f"give milliseconds in (0, 200] (Linux's default minimum is 200 ms), got {s}")
    return v


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    """A parser of floats in [lo, hi], either end open as asked."""
    def parse(s: str) -> float:
        v = float(s)
        if not ((lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
            raise ValueError(f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}"
                             f"{')' if hi_open else ']'}, got {s}")
        return v
    return parse


def auto_or(parse):
    """A parser of 'auto' (None: the program chooses) or what `parse` takes."""
    def parse_auto(s: str):
        return None if s.strip() == "auto" else parse(s)
    return parse_auto


def number(v: float) -> str:
    """A float as text that parses back to the same float."""
    return repr(float(v))


# ---------------------------------------------------------------------------------------------
# ranks


def rank_set(option: str):
    """A parser of '2,3' -> {2, 3} for `option` (which ranks exist is checked once the world size
    is known: tree.check)."""
    return lambda spec: frozenset(parse_ranks(spec, option))


def format_ranks(ranks) -> str:
    return ",".join(map(str, sorted(ranks)))


def rank_values(option: str, lo: float = 0.0, hi: float = 1.0, closed: bool = False):
    """A parser of '2:0.05,3:0.1' -> {2: 0.05, 3: 0.1} for `option`, each value in [lo, hi)
    ([lo, hi] when closed)."""
    return lambda spec: parse_rank_values(spec, option, values=(lo, hi), closed=closed)


def format_rank_values(values: dict[int, float]) -> str:
    return ",".join(f"{r}:{number(v)}" for r, v in sorted(values.items()))


def link_losses(option: str):
    """A parser of link losses for `option`: fixed ('2:0.05' -> {2: 0.05}) or changing at steps
    ('2:0@0,2:0.1@50' -> {2: ((0, 0.0), (50, 0.1))}: net/loss.py's LossSchedule); a rank whose
    only item is at step 0 has a fixed loss."""
    def parse(spec: str):
        if "@" not in (spec or ""):
            return parse_rank_values(spec, option, values=(0.0, 1.0))
        schedules = parse_rank_schedule(spec, option)
        return {r: c[0][1] if len(c) == 1 and c[0][0] == 0 else c for r, c in schedules.items()}
    return parse


def format_link_losses(values: dict) -> str:
    return ",".join(f"{r}:{number(v)}" if not isinstance(v, tuple)
                    else ",".join(f"{r}:{number(p)}@{s}" for s, p in v)
                    for r, v in sorted(values.items()))


def rank_slowdowns(option: str):
    """A parser of '1:3@20' -> {1: (3.0, 20)} for `option`."""
    return lambda spec: parse_slowdowns(spec, option)


def format_slowdowns(values: dict[int, tuple[float, int]]) -> str:
    return ",".join(f"{r}:{number(f)}@{s}" for r, (f, s) in sorted(values.items()))


# ---------------------------------------------------------------------------------------------
# memory budgets

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "ki": 2**10, "mi": 2**20, "gi": 2**30}


@dataclass(frozen=True)
class Budget:
    """The most weight bytes a rank keeps resident: a size, or a share of its own weights."""
    text: str                      # as the user wrote it (its formatter gives it back)
    bytes: float | None = None     # a size, or
    share: float | None = None     # a share in (0, 1]

    @classmethod
    def parse(cls, text: str) -> Budget:
        """'150MB', '1.5GB', '800M', '50%'."""
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[kKmMgG]i?[bB]?|[bB]?)\s*", text or "")
        if not m or float(m.group(1)) <= 0:
            raise HaloError(f"--mem-budget {text!r}: give a size (150MB, 1.5GB) or a share of the "
                            f"rank's weights (50%)")
        value, unit = float(m.group(1)), m.group(2).lower()
        if unit == "%":
            if value > 100:
                raise HaloError(f"--mem-budget {text}: a share is at most 100%")
            return cls(text.strip(), share=value / 100)
        return cls(text.strip(), bytes=value * _UNITS[unit])

    def of(self, weights: float) -> float:
        """The budget in bytes for a rank whose weights take `weights` bytes."""
        return self.bytes if self.bytes is not None else self.share * weights

    def __str__(self) -> str:
        return self.text
