"""Fault injection under mpiexec: a rank frozen for good (SIGSTOP, never resumed), with MPICH's
shared memory and without (MPIR_CVAR_NOLOCAL=1), and a rank killed (SIGKILL) under the default
launch and the fault-tolerant one (-disable-auto-cleanup, a proxy per rank). Strict sync, pipeline
mode and a frozen rank 0 end the job naming the rank; HALO sync goes on without an unstable rank;
nothing hangs past the timeouts.

How long the job may take to end after the fault is the timeout it should notice it by, plus a
margin that grows with the machine's load: a few seconds and as long again as the same job took
to start (measured in the same run, under the same load), so two CPU hogs beside the suite
stretch both alike instead of failing the test."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
from conftest import halo_cmd, pid_of_rank

SHM = {"shm": {}, "no-shm": {"MPIR_CVAR_NOLOCAL": "1"}}


@dataclass
class Ended:
    code: int
    took: float            # seconds from the signal to the end of the job
    started_s: float       # seconds from the launch to the `started` line: the load's yardstick
    out: str
    err: str

    def within(self, timeout: float, margin: float = 6.0) -> bool:
        """Ended within `timeout` plus `margin` plus the start-up time (see the module docstring)."""
        return self.took < timeout + margin + self.started_s


def freeze_during_run(args: list[str], rank: int, env: dict, limit: float = 120.0,
                      sig: int = signal.SIGSTOP, launch: tuple[str, ...] = (), mode: str = "tensor",
                      started: str = "tensor-parallel on 3 ranks", stream: str = "stderr") -> Ended:
    """Start a 3-rank run, SIGSTOP `rank` for good (or send it `sig`) once rank 0 has written a
    line starting with `started` on `stream`."""
    mark = uuid.uuid4().hex
    launched_at = time.time()
    proc = subprocess.Popen(halo_cmd("generate", "--parallel", mode, *args, ranks=3, launch=launch),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env, "HALO_TEST_MARK": mark})
    pid = None
    try:
        lines, end = [], time.time() + limit
        watched = getattr(proc, stream)
        while time.time() < end and proc.poll() is None:
            lines.append(watched.readline())
            if lines[-1].startswith(started):
                break
        pid = pid_of_rank(mark, rank)
        assert pid is not None and proc.poll() is None, "".join(lines)
        os.kill(pid, sig)
        t0 = time.time()
        out, err = proc.communicate(timeout=limit)
        took, before = time.time() - t0, "".join(lines)
        if stream == "stdout":
            return Ended(proc.returncode, took, t0 - launched_at, before + out, err)
        return Ended(proc.returncode, took, t0 - launched_at, out, before + err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.parametrize("shm", sorted(SHM))
def test_strict_ends_within_the_rank_timeout_naming_the_frozen_rank(tiny_store_path, shm):
    end = freeze_during_run(
        ["--sync", "strict", "--weights", str(tiny_store_path), "--prompt", "hi", "--max-new-tokens", "250",
         "--ignore-eos", "--quiet", "--rank-timeout", "2"], rank=2, env=SHM[shm])
    code, err = end.code, end.err
    assert code != 0 and end.within(2), err
    assert err.count("halo-mpi: error on rank 0: rank 2 silent for 2 s (--rank-timeout)") == 1, err
    assert "strict sync cannot go on without it" in err


def test_a_worker_ends_when_rank_0_freezes(tiny_store_path):
    end = freeze_during_run(
        ["--sync", "strict", "--weights", str(tiny_store_path), "--prompt", "hi", "--max-new-tokens", "250",
         "--ignore-eos", "--quiet", "--rank-timeout", "1"], rank=0, env={})
    code, err = end.code, end.err
    assert code != 0 and end.within(1 + 5), err           # a worker waits 5 s longer than rank 0
    assert "rank 0 silent for 6 s (--rank-timeout), frozen or dead: rank 0 leads the run" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("shm", sorted(SHM))
def test_halo_goes_on_without_a_frozen_unstable_rank(real_store_path, tmp_path, shm):
    stats = tmp_path / "s.json"
    end = freeze_during_run(
        ["--sync", "halo", "--link-loss", "2:0.05", "--weights", str(real_store_path),
         "--prompt", "Once upon a time", "--max-new-tokens", "48", "--ignore-eos", "--temperature", "0",
         "--rank-timeout", "2", "--stats-json", str(stats)], rank=2, env=SHM[shm], limit=300)
    code, err = end.code, end.err
    s = json.loads(stats.read_text())
    assert s["tokens"] == 48 and s["pending_requests_at_end"] == 0, err
    assert s["ms_per_token_max"] < 2000 + 1000, err        # no token waits past the timeout + 1 s
    assert "2" in s["config"]["unreachable"] and "rank 2 silent for 2 s at step" in err, err
    # the frozen rank cannot be finalized: the job ends with one line saying so, not a hang
    assert code != 0 and err.count("rank 2 did not answer at the end") == 1, err


@pytest.mark.parametrize("shm", sorted(SHM))
def test_a_killed_worker_ends_the_job_at_once(tiny_store_path, shm):
    """SIGKILL: MPICH's launcher ends every rank (exit 9, its banner; no rank can name the dead one:
    README, "A dead worker"); what matters here is that nothing waits for it."""
    end = freeze_during_run(
        ["--sync", "halo", "--link-loss", "2:0.05", "--weights", str(tiny_store_path), "--prompt", "hi",
         "--max-new-tokens", "250", "--ignore-eos", "--quiet"], rank=2, env=SHM[shm], sig=signal.SIGKILL)
    assert end.code != 0 and end.within(0, margin=10), end.err


def fault_tolerant_launch(tmp_path) -> tuple[str, ...]:
    """The launch of README "A dead worker" as on a cluster of one rank per node: hydra with
    -disable-auto-cleanup and one proxy per host. Here the hosts are names in a hostfile that the
    fork launcher starts locally, so each rank has a proxy of its own, as on separate devices."""
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"node{i}:1\n" for i in range(3)))
    return ("-disable-auto-cleanup", "-launcher", "fork", "-f", str(hosts))


@pytest.mark.slow
def test_halo_goes_on_without_a_killed_unstable_rank(real_store_path, tmp_path):
    """SIGKILL under the fault-tolerant launch: every token comes out, the dead rank is named once
    as unreachable and at the end, and nothing waits for it."""
    stats = tmp_path / "s.json"
    end = freeze_during_run(
        ["--sync", "halo", "--link-loss", "2:0.05", "--weights", str(real_store_path), "--prompt",
         "Once upon a time", "--max-new-tokens", "48", "--ignore-eos", "--temperature", "0", "--threads", "1",
         "--rank-timeout", "2",
         "--stats-json", str(stats)], rank=2, env={}, sig=signal.SIGKILL,
        launch=fault_tolerant_launch(tmp_path), limit=300)
    code, err = end.code, end.err
    s = json.loads(stats.read_text())
    assert s["tokens"] == 48 and s["pending_requests_at_end"] == 0, err
    assert "2" in s["config"]["unreachable"], err
    assert err.count("rank 2 silent since the launcher reported a dead process at step") == 1, err
    assert s["ms_per_token_max"] < 2000 + 1000, err
    assert code == 3 and err.count("rank 2 did not answer at the end") == 1, err


def test_strict_names_a_killed_rank(tiny_store_path, tmp_path):
    end = freeze_during_run(
        ["--sync", "strict", "--weights", str(tiny_store_path), "--prompt", "hi", "--max-new-tokens", "250",
         "--ignore-eos", "--quiet", "--threads", "1", "--rank-timeout", "30"], rank=2, env={},
        sig=signal.SIGKILL, launch=fault_tolerant_launch(tmp_path))
    code, err = end.code, end.err
    # named once the launcher has reported the death (3 heartbeats), not by the 30 s timeout
    assert code == 3 and "silent for 30 s" not in err, err
    assert err.count("halo-mpi: error on rank 0: rank 2 died (the launcher reported a process failure)") == 1


def test_pipeline_writes_the_finished_sequences_and_names_a_killed_rank(deep_store_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(40)))
    end = freeze_during_run(
        ["--weights", str(deep_store_path), "--prompt-file", str(prompts), "--num-sequences", "3",
         "--max-new-tokens", "60", "--ignore-eos", "--quiet", "--threads", "1", "--rank-timeout", "30"],
        rank=2, env={}, sig=signal.SIGKILL, launch=fault_tolerant_launch(tmp_path), mode="pipeline",
        started="[", stream="stdout")       # a sequence's text: it has finished
    code, out, err = end.code, end.out, end.err
    assert code == 3 and "silent for 30 s" not in err, err
    assert "rank 2 died (the launcher reported a process failure): pipeline mode cannot go on" in err
    finished = [line for line in out.splitlines() if line.startswith("[")]
    assert 0 < len(finished) < 40, out


@pytest.mark.parametrize("through", [False, True])
def test_the_watchdog_ends_a_rank_held_past_its_timeout(through):
    """net/launch.watchdog: a rank held (here: asleep) past the timeout is ended with rank 0's
    line; one that says it is through in time is left alone, and so is the watchdog's exit."""
    code = ("import os, time\n"
            "from halo_mpi.net.launch import watchdog\n"
            "proc, through = watchdog(1.0, 'held for {:g} s')\n"
            f"if {through}:\n"
            "    os.close(through); proc.wait()\n"
            f"time.sleep({3 if through else 600})\n"     # held: ended long before the sleep would end
            "print('done', flush=True)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PMI_RANK": "0"})
    if through:
        assert run.returncode == 0 and run.stdout == "done\n" and run.stderr == "", run.stderr
    else:
        assert run.returncode == -signal.SIGTERM, run
        assert run.stderr == "halo-mpi: error on rank 0: held for 1 s\n" and run.stdout == ""
