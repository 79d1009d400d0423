"""The changing-loss scenario: one long tensor-parallel generation while a rank's link turns bad
and recovers, and how ms/token, the dropped share and the ranks' shares follow it.

    halo-mpi bench --scenario changing-loss --net testbed --ranks 3 --lossy-ranks 2 \\
        --phases 0,0.1,0.3,0 --phase-tokens 50 --weights weights/smollm2-135m-q4.h5

Phases are counted in decode tokens (token 0: the first after the prompt's). On the emulation
(`--net emulated`) the loss changes at exactly the phases' steps (`--link-loss RANK:P@STEP`). On
the testbed the job (rank 0) appends a line per token to a progress file; a thread of the bench
reads it and replaces the iptables rules once the count reaches a phase's start (one token early,
as a change takes a few ms), and records from which token the new loss was in place: the phases
are split there. Writes changing-loss.json (the per-token records and the figures),
changing-loss.png (bench/recovery.py) and changing-loss.log (the job's own output) to --out.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace

from ..errors import HaloError
from ..net.launch import mpiexec_path
from ..options.tree import ModeOptions
from ..stats import RunStats, write_json
from ..store.hdf5 import Store
from ..testbed.bed import Testbed
from ..testbed.change import LossSchedule, run_following
from ..testbed.launch import stop_job
from .loss import PROMPT, machine_description
from .rank import Task, command
from .recovery import figures, format_figures, plot_scenario

POLL_S = 0.002          # how often the progress file is read


@dataclass
class ChangingLoss:
    base: ModeOptions                # --weights, --dtype, --threads, --sync, --unstable-ranks, ...
    ranks: int
    lossy: list[int]                 # the ranks whose link changes (together)
    phases: list[float]              # the loss of each phase
    phase_tokens: list[int]          # the decode tokens of each phase
    net: str = "emulated"            # emulated | testbed
    out: str = "results"
    warmup: int = 8                  # the first phase's first tokens, left out of its median
    timeout: float = 1800.0
    rto_min_ms: float | None = None  # testbed: TCP's minimum retransmission timeout

    @property
    def starts(self) -> list[int]:
        """The token at which each phase is planned to start."""
        return [sum(self.phase_tokens[:k]) for k in range(len(self.phases))]

    @property
    def tokens(self) -> int:
        return sum(self.phase_tokens)


def check_config(cfg: ChangingLoss):
    if len(cfg.phase_tokens) != len(cfg.phases) or not cfg.phases:
        raise HaloError(f"--phase-tokens gives {len(cfg.phase_tokens)} lengths for "
                        f"{len(cfg.phases)} --phases: give one, or one per phase")
    if not all(0 <= p < 1 for p in cfg.phases):
        raise HaloError(f"--phases {cfg.phases}: each loss is in [0, 1)")
    if cfg.ranks < 2 or not cfg.lossy or not all(0 < r < cfg.ranks for r in cfg.lossy):
        raise HaloError(f"--lossy-ranks {cfg.lossy}: workers of the {cfg.ranks} ranks (1..{cfg.ranks - 1})")


def first_decode_step(weights: str, prefill_chunk: int) -> int:
    """The step of token 0's decode: the prompt's prefill chunks are the steps before it."""
    from ..model.tokenizer import Tokenizer
    with Store(weights) as store:
        n = len(Tokenizer.from_store(store).encode(PROMPT))
    return math.ceil(n / prefill_chunk) + 1


def emulated_options(cfg: ChangingLoss) -> ModeOptions:
    """The run's options with the phases as --link-loss RANK:P@STEP on each lossy rank."""
    first = first_decode_step(cfg.base.weights, cfg.base.prefill_chunk)
    steps = [0] + [first + s for s in cfg.starts[1:]]
    schedule = tuple(zip(steps, cfg.phases))
    return replace(cfg.base, tensor=replace(cfg.base.tensor, link_loss={r: schedule for r in cfg.lossy}))


def run_emulated(cfg: ChangingLoss, task: Task, progress: Progress) -> tuple[list[dict], str | None]:
    """The job under mpiexec, the phases in its options, its progress file read meanwhile: (no
    changes to record: they are read back from the steps, see phase_starts), and why it stopped
    short (a timeout, a failure), or None."""
    options = replace(emulated_options(cfg), parallel="tensor")
    cmd = [mpiexec_path(), "-n", str(cfg.ranks), *command(options, task)]
    with open(job_log(cfg), "w+") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + cfg.timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                progress()
                time.sleep(POLL_S)
            timed_out = proc.poll() is None
        finally:
            stop_job(proc)              # (a Ctrl-C too: every rank ends)
        if timed_out:
            return [], (f"changing-loss run did not finish within {cfg.timeout:.0f} s "
                        f"({how_far(progress(), [])})")
        log.seek(0)
        why = error_line(log.read())
    if proc.returncode != 0:
        return [], f"changing-loss run failed ({how_far(progress(), [])}): {why}"
    return [], None


def run_testbed(cfg: ChangingLoss, task: Task, progress: Progress) -> tuple[list[dict], str | None]:
    """The job on a testbed made for it, the phases applied as its progress file grows: the
    changes as applied (token counts: `asked_at`, `in_place_at`), and why it stopped short (a
    timeout, a failure), or None."""
    options = replace(cfg.base, parallel="tensor")
    # a phase starting at token s is asked for once s tokens are out (the decode of token s-1 runs)
    schedule = LossSchedule([(s, r, p) for s, p in zip(cfg.starts, cfg.phases) for r in cfg.lossy])
    with Testbed(cfg.ranks, {}, rto_min_ms=cfg.rto_min_ms) as tb:
        try:
            done = run_following(tb, command(options, task)[3:], schedule, progress,
                                 module="mpi4py", timeout=cfg.timeout, capture=True)
        except HaloError as e:
            return schedule.applied, f"{e} ({how_far(progress(), schedule.applied)})"
    with open(job_log(cfg), "w") as f:
        f.write(done.stderr)
    if done.returncode != 0:
        return schedule.applied, (f"changing-loss run on the testbed failed "
                                  f"({how_far(progress(), schedule.applied)}): {error_line(done.stderr)}")
    return schedule.applied, None


def job_log(cfg: ChangingLoss) -> str:
    """Where the job's own output goes (its report, or why it failed): changing-loss.log in --out."""
    os.makedirs(cfg.out, exist_ok=True)
    return os.path.join(cfg.out, "changing-loss.log")


RAISED = re.compile(r"^[\w.]+(Error|Exception|Silent|Interrupted)\w*: ")   # a traceback's last line


def error_line(stderr: str) -> str:
    """What a failed job said: its last `halo-mpi: error` line, else the exception it raised,
    else its last line."""
    lines = stderr.strip().splitlines() or ["no output"]
    return next((line for line in reversed(lines) if "halo-mpi: error" in line),
                next((line for line in reversed(lines) if RAISED.match(line)), lines[-1]))


def how_far(tokens: int, applied: list[dict]) -> str:
    """Where a run that was stopped had got to: its decode tokens, the loss changes in place."""
    changes = ", ".join(f"rank {c['rank']} loss {c['loss']:g} from token {c['in_place_at']}" for c in applied)
    return f"{max(tokens - 1, 0)} decode tokens done; {changes or 'no loss change'}"


class Progress:
    """The job's progress file read as a count of tokens out; `times` keeps when each was first
    seen (time.monotonic, to the poll's few ms): the per-token times of a run stopped short,
    which writes no statistics."""

    def __init__(self, path: str):
        self.path, self.times = path, []

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as f:
                n = f.read().count(b"\n")
        except FileNotFoundError:
            n = 0
        now = time.monotonic()
        self.times += [now] * (n - len(self.times))
        return n


def phase_starts(cfg: ChangingLoss, applied: list[dict], decode_steps: list[int]) -> list[int]:
    """The token from which each phase's loss was in place. Testbed: tokens out when the last of
    its changes was in place (the decode then running may have met either loss). Emulated: the
    first token whose step is at or after the phase's step."""
    if cfg.net == "testbed":
        starts = []
        for k, s in enumerate(cfg.starts):
            mine = [c["in_place_at"] for c in applied if c["at"] == s]
            starts.append(0 if k == 0 else max(s, max(mine, default=s)))
        return starts
    if not decode_steps:                  # a run stopped short: token t was step first + t
        return list(cfg.starts)
    first = first_decode_step(cfg.base.weights, cfg.base.prefill_chunk)
    return [0] + [next((i for i, step in enumerate(decode_steps) if step >= first + s), len(decode_steps))
                  for s in cfg.starts[1:]]


def token_records(stats: RunStats, starts: list[int], phases: list[float]) -> list[dict]:
    """One record per decode token: its step, ms, dropped share, loss in force and each rank's
    share of the MLP groups under the plan in force at its step."""
    steps = stats.config.get("decode_steps", [])
    switches = stats.config.get("plan_switches", [])
    dropped = stats.dropped_share_per_token
    records = []
    for i, ms in enumerate(stats.decode_ms):
        step = steps[i] if i < len(steps) else None
        plan = [s for s in switches if step is None or s["step"] <= step]
        phase = max(k for k, s in enumerate(starts) if s <= i)
        records.append({"token": i, "step": step, "ms": ms,
                        "dropped_share": dropped[i] if i < len(dropped) else 0.0,
                        "loss": phases[phase], "mlp_share": plan[-1]["mlp_share"] if plan else {}})
    return records


def read_stats(path: str) -> RunStats:
    with open(path) as f:
        return RunStats.from_json(json.load(f))


def progress_records(progress: Progress, starts: list[int], phases: list[float]) -> list[dict]:
    """The records of a run stopped short, from when each token was seen in its progress file
    (ms only: no statistics came back)."""
    t = progress.times
    return [{"token": i, "step": None, "ms": 1e3 * (t[i + 1] - t[i]), "dropped_share": math.nan,
             "loss": phases[max(k for k, s in enumerate(starts) if s <= i)], "mlp_share": {}}
            for i in range(len(t) - 1)]


def run_scenario(cfg: ChangingLoss, log=print) -> dict:
    """Run the scenario once; its records, changes and figures (also written to cfg.out)."""
    check_config(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        task = Task("generate", PROMPT, cfg.tokens + 1, out=os.path.join(tmp, "gen.json"),
                    progress=os.path.join(tmp, "progress"))
        progress = Progress(task.progress)
        applied, stopped = (run_testbed if cfg.net == "testbed" else run_emulated)(cfg, task, progress)
        stats = None if stopped else read_stats(task.out)
    config = stats.config if stats else {"sync": cfg.base.tensor.sync,
                                         "unstable_ranks": sorted(cfg.base.tensor.unstable)}
    starts = phase_starts(cfg, applied, config.get("decode_steps", []))
    records = (token_records(stats, starts, cfg.phases) if stats
               else progress_records(progress, starts, cfg.phases))
    result = {"net": cfg.net, "ranks": cfg.ranks, "lossy_ranks": cfg.lossy, "phases": cfg.phases,
              "planned_starts": cfg.starts, "starts": starts, "changes": applied, "stopped": stopped,
              "sync": config.get("sync"), "unstable_ranks": config.get("unstable_ranks"),
              "replans": config.get("replans", []), "machine": machine_description(),
              "figures": figures([r["ms"] for r in records], starts, cfg.phases, cfg.warmup),
              "records": records}
    write_scenario(result, cfg.out)
    log(format_figures(result["figures"]))
    return result


def write_scenario(result: dict, out: str) -> bool:
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "changing-loss.json"), result)
    declared = f", unstable {result['unstable_ranks']}" if result.get("unstable_ranks") else ""
    title = (f"changing loss on ranks {result['lossy_ranks']} ({result['net']}), {result['ranks']} "
             f"ranks, sync {result['sync']}{declared}")
    return plot_scenario(result["records"], result["starts"], result["phases"], title,
                         os.path.join(out, "changing-loss.png"))
