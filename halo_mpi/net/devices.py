"""The cluster as the user describes it: each rank's device (speed, memory budget, link reliability).

One reader and one type for both parallel modes. A device profile is a TOML file, one table per
rank; ranks not listed take [default], and every key is optional:

    [default]
    speed = 1.0            # relative compute speed; only ratios matter
    memory_mb = 4096       # budget for this rank's weights (pipeline mode: and its KV caches), MB
    reliability = 1.0      # prior probability that this rank's link delivers on time (tensor mode)
    [rank.2]
    speed = 0.5            # e.g. a Raspberry Pi 4 among Pi 5s
    reliability = 0.9

Tensor mode places MLP groups by speed, memory and reliability; pipeline mode splits layers by
speed within the memory budgets. A budget covers weights (and KV caches) only: each rank's Python,
torch and MPI take another ~250 MB (measured on the dev machine).
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field

from ..errors import HaloError

KEYS = ("speed", "memory_mb", "reliability")
UNSTABLE_RELIABILITY = 0.9   # prior of a rank named unstable (--unstable-ranks, --link-loss)
STABLE = 0.97                # reliability at or above which a link counts as stable


@dataclass
class Device:
    speed: float = 1.0             # relative compute speed (1.0 = the reference device)
    memory_mb: float = math.inf    # budget for this rank's weights (and KV caches), MB
    reliability: float = 1.0       # prior probability that a partial arrives on time


@dataclass
class ClusterSpec:
    ranks: list[Device] = field(default_factory=list)   # rank -> its device

    @property
    def size(self) -> int:
        return len(self.ranks)

    @classmethod
    def uniform(cls, size: int, unstable=()) -> ClusterSpec:
        return cls([Device(reliability=UNSTABLE_RELIABILITY if r in unstable else 1.0)
                    for r in range(size)])

    def describe(self) -> str:
        return ", ".join(f"rank {r}: speed {d.speed:g}, reliability {d.reliability:.2f}"
                         + (f", {d.memory_mb:g} MB" if d.memory_mb != math.inf else "")
                         for r, d in enumerate(self.ranks))


def read_device_profile(path: str | None, size: int, unstable=()) -> ClusterSpec:
    """The devices of ranks 0..size-1 from a TOML profile (uniform devices without one). Ranks in
    `unstable` get at most UNSTABLE_RELIABILITY unless the profile sets their reliability."""
    if not path:
        return ClusterSpec.uniform(size, unstable)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise HaloError(f"cannot read --device-profile {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise HaloError(f"--device-profile {path} is not valid TOML: {e}") from None
    unknown = set(doc) - {"default", "rank"}
    if unknown:
        raise HaloError(f"--device-profile {path}: unknown table(s) {', '.join(sorted(unknown))}; "
                        f"use [default] and [rank.N]")
    default = doc.get("default", {})
    per_rank = doc.get("rank", {})
    if not isinstance(per_rank, dict):
        raise HaloError(f"--device-profile {path}: rank must be tables [rank.N], got {per_rank!r}")
    bad = sorted(k for k in per_rank if not (k.isdigit() and int(k) < size))
    if bad:
        raise HaloError(f"--device-profile {path} describes [rank.{bad[0]}], but the run has ranks "
                        f"0..{size - 1}")
    _check_keys(default, path, "[default]")
    devices = []
    for r in range(size):
        own = per_rank.get(str(r), {})
        _check_keys(own, path, f"[rank.{r}]")
        d = _device({**default, **own}, path, f"[rank.{r}]")
        if r in unstable and "reliability" not in own:
            d.reliability = min(d.reliability, UNSTABLE_RELIABILITY)
        devices.append(d)
    return ClusterSpec(devices)


def _check_keys(table, path: str, where: str):
    if not isinstance(table, dict):
        raise HaloError(f"--device-profile {path}: {where} must be a table of {', '.join(KEYS)}, "
                        f"got {table!r}")
    unknown = set(table) - set(KEYS)
    if unknown:
        raise HaloError(f"--device-profile {path} {where}: unknown key(s) {', '.join(sorted(unknown))}; "
                        f"use {', '.join(KEYS)}")


def _device(table: dict, path: str, where: str) -> Device:
    d = Device(**table)
    rules = {"speed": ("> 0 and finite", lambda v: 0 < v < math.inf), "memory_mb": ("> 0", lambda v: v > 0),
             "reliability": ("in (0, 1]", lambda v: 0 < v <= 1)}
    for key, (rule, ok) in rules.items():
        value = getattr(d, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
            raise HaloError(f"--device-profile {path} {where}: {key} must be a number {rule}, "
                            f"got {value!r}")
    d.speed, d.memory_mb, d.reliability = float(d.speed), float(d.memory_mb), float(d.reliability)
    return d
