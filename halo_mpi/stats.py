"""Run statistics: one schema for every mode, written by `--stats-json` and read by `bench`.

    {"mode": "tensor", "ranks_total": 4, "dtype": "float32", "tokens": 64,
     "ms_per_token_median": ..., "ms_per_token_p95": ..., "ms_per_token_p99": ..., "ms_per_token_max": ...,
     "slow_tokens": (tokens over 3x the median), "tokens_per_s": ..., "decode_ms": [...],
     "dropped_share_mean": ..., "pending_requests_at_end": 0, "wall_s": ..., "prefill_s": ...,
     "config": {mode-specific settings}, "sequences": [...], "ranks": [...],
     "step_ms": [...], "step_batch": [...]}     (batched runs: each step's time and sequences)

Every field above is present in every mode; a rank's entry has the common fields of `RankStats`
plus what its mode adds (tensor: groups, on_time_rate, ...; pipeline: layers, busy_share, ...).
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
from dataclasses import asdict, dataclass, field, fields

from .errors import HaloError


def peak_rss_mb() -> float:
    """Peak resident memory of this process, loading transients included, in MB. Linux's VmHWM
    (this program's own high-water mark): ru_maxrss also keeps the peak of the process it was
    exec'd from (a fork of a large parent, e.g. a test runner of 1.5 GB, reads as 1.5 GB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024           # kB -> MB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return 0.0


class RssTrace:
    """Resident memory every `every` ticks (steps): [[tick, MB], ...], so a long run shows
    whether memory grows (the soak check: the last sample against an early one)."""

    def __init__(self, every: int):
        self.every, self.ticks, self.samples = every, 0, []

    def tick(self):
        self.at(self.ticks + 1)

    def at(self, tick: int):
        """A sample at `tick` (a count that never goes back, such as rank 0's step, which a
        satellite sees only now and then) when it enters another window of `every`."""
        if tick // self.every > self.ticks // self.every:
            self.samples.append([tick, round(rss_mb(), 1)])
        self.ticks = max(self.ticks, tick)


def cpu_seconds() -> float:
    """CPU time this process used: with waiting that never spins it stays near compute time."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


@dataclass
class SequenceStats:
    index: int                  # the prompt's index
    prompt_tokens: int
    tokens: list[int]           # generated ids, stop token excluded
    stopped_by: str
    prefill_s: float            # time to the first token
    decode_ms: list[float]      # one entry per decode step

    @classmethod
    def of(cls, index: int, result) -> SequenceStats:
        """From a model.generate.GenerationResult."""
        return cls(index, result.prompt_tokens, list(result.tokens), result.stopped_by,
                   result.prefill_s, [1e3 * s for s in result.decode_s])


@dataclass
class RankStats:
    rank: int
    peak_rss_mb: float
    cpu_s: float
    compute_s: float = 0.0
    wait_s: float = 0.0
    pending_requests_at_end: int = 0
    extra: dict = field(default_factory=dict)   # what the mode adds, flattened into the JSON
    weight_bytes: int = 0                       # resident parameter bytes on this rank


@dataclass
class RunStats:
    mode: str                                   # single | tensor | pipeline
    ranks_total: int
    dtype: str
    sequences: list[SequenceStats]
    ranks: list[RankStats]
    tokens_per_s: float                         # generated tokens per second, all sequences
    wall_s: float
    dropped_share_per_token: list[float] = field(default_factory=list)   # tensor mode only
    config: dict = field(default_factory=dict)  # the mode's settings (sync, loss, split, ...)
    step_ms: list[float] = field(default_factory=list)   # batched runs: each step's wall time
    step_batch: list[int] = field(default_factory=list)  # batched runs: sequences in each step

    @property
    def decode_ms(self) -> list[float]:
        return [d for s in self.sequences for d in s.decode_ms]

    @property
    def tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    def as_json(self) -> dict:
        decode = self.decode_ms
        dropped = self.dropped_share_per_token
        out = {k: v for k, v in asdict(self).items() if k not in ("sequences", "ranks")}
        out.update(
            tokens=self.tokens, decode_ms=decode,
            ms_per_token_median=statistics.median(decode) if decode else math.nan,
            ms_per_token_p95=quantile(decode, 0.95),
            ms_per_token_p99=quantile(decode, 0.99),
            ms_per_token_max=max(decode, default=math.nan),
            # a stall hides in a median: count the tokens that took over 3x it
            slow_tokens=sum(d > 3 * statistics.median(decode) for d in decode) if decode else 0,
            prefill_s=sum(s.prefill_s for s in self.sequences),
            dropped_share_mean=sum(dropped) / len(dropped) if dropped else 0.0,
            dropped_share_max=max(dropped, default=0.0),
            pending_requests_at_end=sum(r.pending_requests_at_end for r in self.ranks),
            sequences=[asdict(s) for s in self.sequences],
            ranks=[{**{f.name: getattr(r, f.name) for f in fields(r) if f.name != "extra"}, **r.extra}
                   for r in self.ranks])
        return _finite(out)

    @classmethod
    def from_json(cls, d: dict) -> RunStats:
        common = {f.name for f in fields(RankStats)} - {"extra"}
        ranks = [RankStats(**{k: v for k, v in r.items() if k in common},
                           extra={k: v for k, v in r.items() if k not in common}) for r in d["ranks"]]
        own = {f.name for f in fields(cls)} - {"sequences", "ranks"}
        return cls(**{k: d[k] for k in own if k in d}, sequences=[SequenceStats(**s) for s in d["sequences"]],
                   ranks=ranks)

    def write(self, path: str):
        write_json(path, self.as_json())


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), NaN for no samples."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _finite(obj):
    """NaN and infinity are not JSON: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, obj):
    """Write JSON whole or not at all: a temporary file beside the target, then a rename."""
    tmp = f"{path}.partial"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise HaloError(f"cannot write {path}: {e.strerror or e}") from None
        raise
