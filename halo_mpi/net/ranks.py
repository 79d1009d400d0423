"""Rank lists and RANK:VALUE maps from the command line, checked once, with one-line errors.

    parse_rank_values("2:0.05,3:0.05", "--link-loss", ranks=range(1, 4), values=(0, 1))
    parse_ranks("2,3", "--unstable-ranks", ranks=range(1, 4))
"""
from __future__ import annotations

from ..errors import HaloError

WORKERS = "the workers are ranks"


def check_ranks(found, option: str, ranks: range | None, who: str = WORKERS):
    """Every rank in `found` is one of `ranks`; one line naming the others."""
    if ranks is None:
        return
    bad = sorted(r for r in found if r not in ranks)
    if bad:
        allowed = f"{ranks.start}..{ranks.stop - 1}" if len(ranks) else "none"
        raise HaloError(f"{option} names rank{'s' if len(bad) > 1 else ''} "
                        f"{', '.join(map(str, bad))}, but {who} {allowed}")


def parse_rank_values(spec: str | None, option: str, ranks: range | None = None,
                      values: tuple[float, float] | None = None, closed: bool = False,
                      who: str = WORKERS) -> dict[int, float]:
    """'1:0.05,3:0.1' -> {1: 0.05, 3: 0.1}. `ranks`: the ranks the option may name (`who`
    says which they are, in the error); `values`: the range [lo, hi) each value must lie in
    (closed=True: [lo, hi])."""
    out: dict[int, float] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        try:
            rank_s, value_s = item.split(":")
            rank, value = int(rank_s), float(value_s)
        except ValueError:
            raise HaloError(f"{option} item {item!r} is not RANK:VALUE (e.g. 2:0.05)") from None
        if rank in out:
            raise HaloError(f"{option} names rank {rank} twice")
        out[rank] = value
    check_ranks(out, option, ranks, who)
    if values is not None:
        lo, hi = values
        for rank, v in out.items():
            if not (lo <= v <= hi if closed else lo <= v < hi):
                raise HaloError(f"{option} value {v:g} for rank {rank} is not in "
                                f"[{lo:g}, {hi:g}{']' if closed else ')'}")
    return out


def parse_ranks(spec: str | None, option: str, ranks: range | None = None,
                who: str = WORKERS) -> set[int]:
    """'2,3' -> {2, 3}; an empty spec is the empty set."""
    try:
        found = {int(x) for x in (spec or "").split(",") if x.strip()}
    except ValueError:
        raise HaloError(f"{option} {spec!r} is not a comma list of ranks") from None
    check_ranks(found, option, ranks, who)
    return found


def parse_slowdowns(spec: str | None, option: str) -> dict[int, tuple[float, int]]:
    """'1:3@20,2:1.5@0' -> {1: (3.0, 20), 2: (1.5, 0)}: RANK computes FACTOR (>= 1) times slower
    from step STEP on."""
    out: dict[int, tuple[float, int]] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        try:
            rank_s, rest = item.split(":")
            factor_s, step_s = rest.split("@")
            rank, factor, step = int(rank_s), float(factor_s), int(step_s)
        except ValueError:
            raise HaloError(f"{option} item {item!r} is not RANK:FACTOR@STEP (e.g. 1:3@20)") from None
        if rank in out:
            raise HaloError(f"{option} names rank {rank} twice")
        if not (1.0 <= factor < float("inf")) or step < 0:
            raise HaloError(f"{option} item {item!r}: FACTOR is at least 1 and finite, STEP at least 0")
        out[rank] = (factor, step)
    return out


def parse_floats(spec: str, option: str) -> list[float]:
    """'0,0.01,0.05' -> [0.0, 0.01, 0.05]."""
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise HaloError(f"{option} {spec!r} is not a comma list of numbers") from None


Schedule = tuple[tuple[float, float], ...]      # ((at, value), ...) sorted by at


def parse_rank_schedule(spec: str | None, option: str, unit: str = "",
                        values: tuple[float, float] = (0.0, 1.0)) -> dict[int, Schedule]:
    """'2:0@0,2:0.1@50,2:0@150' -> {2: ((0, 0.0), (50, 0.1), (150, 0.0))}: RANK's value from AT on
    (each rank's changes sorted by AT). `unit`: a suffix AT must carry ('s' for seconds) or none
    (a step); values in [lo, hi). An item without @AT is the rank's value from the start (0)."""
    out: dict[int, dict[float, float]] = {}
    example = f"RANK:VALUE@AT{unit} (e.g. 2:0.1@50{unit})"
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        try:
            rank_s, rest = item.split(":")
            value_s, at_s = rest.split("@") if "@" in rest else (rest, f"0{unit}")
            if unit and not at_s.strip().endswith(unit):
                raise ValueError(at_s)
            rank, value = int(rank_s), float(value_s)
            at = float(at_s.strip()[:len(at_s.strip()) - len(unit)]) if unit else int(at_s)
        except ValueError:
            raise HaloError(f"{option} item {item!r} is not {example}") from None
        lo, hi = values
        if not lo <= value < hi:
            raise HaloError(f"{option} value {value:g} for rank {rank} is not in [{lo:g}, {hi:g})")
        if not 0 <= at < float("inf"):
            raise HaloError(f"{option} item {item!r}: AT is a finite number >= 0")
        if at in out.setdefault(rank, {}):
            raise HaloError(f"{option} names rank {rank} twice at {at:g}{unit}")
        out[rank][at] = value
    return {r: tuple(sorted(changes.items())) for r, changes in out.items()}
