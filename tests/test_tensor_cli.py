"""`halo-mpi generate --parallel tensor` launched as users launch it: mpiexec in a subprocess."""
import json
import os
import signal
import time
import uuid

import pytest
from conftest import halo, halo_cmd, launched, pid_of_rank


def generate(n, store, *extra, timeout=300):
    """12 greedy tokens after "hello" on `n` ranks; `extra`: more options."""
    return halo("generate", "--weights", store, "--prompt", "hello", "--max-new-tokens", 12,
                "--temperature", 0, "--quiet", *extra, ranks=n, timeout=timeout)


def strict_lossy_run(store) -> list[str]:
    """3 ranks in strict sync with 30% loss on both workers: minutes of generation to interrupt;
    the text streams on stdout (so a test can wait for the first token)."""
    return halo_cmd("generate", "--parallel", "tensor", "--sync", "strict", "--link-loss", "1:0.3,2:0.3",
                    "--weights", store, "--prompt", "hi", "--max-new-tokens", 240, "--ignore-eos",
                    ranks=3)


def wait_until_generating(proc, ranks: int = 3):
    """Waits for the condition, not a time: rank 0's plan line (every rank is set up), then the
    first generated character on stdout. Each read blocks until the run writes or ends."""
    line = ""
    while f"tensor-parallel on {ranks} ranks" not in line:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "the run ended before its plan"
    assert proc.stdout.read(1) != "", "the run ended before its first token"
    assert proc.poll() is None, "the run ended before the interrupt"


def wait_for_rank(mark: str, rank: int, proc, timeout: float = 300.0) -> int:
    """The pid of `rank` once it exists (polled; the timeout only guards against a hang)."""
    end = time.monotonic() + timeout
    while (pid := pid_of_rank(mark, rank)) is None:
        assert time.monotonic() < end and proc.poll() is None, f"rank {rank} never started"
        time.sleep(0.2)
    return pid


def test_one_rank_tensor_mode_equals_single_mode(tiny_store_path, tmp_path):
    single = generate(1, tiny_store_path)
    tensor = generate(1, tiny_store_path, "--parallel", "tensor", "--stats-json", str(tmp_path / "s.json"))
    assert single.returncode == 0 and tensor.returncode == 0, tensor.stderr
    assert tensor.stdout == single.stdout
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["pending_requests_at_end"] == 0 and len(stats["ranks"]) == 1
    assert stats["ranks"][0]["weight_bytes"] > 0


def test_stats_json_of_a_lossy_halo_run(tiny_store_path, tmp_path):
    done = generate(3, tiny_store_path, "--parallel", "tensor", "--sync", "halo", "--link-loss", "2:0.05",
                    "--stats-json", str(tmp_path / "s.json"))
    assert done.returncode == 0, done.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    for key in ("ms_per_token_median", "dropped_share_mean", "pending_requests_at_end", "ranks"):
        assert key in s
    assert 0 <= s["dropped_share_mean"] <= 1 and s["pending_requests_at_end"] == 0
    assert [r["rank"] for r in s["ranks"]] == [0, 1, 2]
    assert all(r["cpu_s"] > 0 and r["peak_rss_mb"] > 0 and r["weight_bytes"] > 0 for r in s["ranks"])
    assert "weights-MB" in done.stderr
    assert "on-time" in done.stderr and "dropped importance share" in done.stderr
    assert f"re-plans: {len(s['config']['replans'])}" in done.stderr


def test_bad_option_gives_one_line_on_every_rank(tiny_store_path):
    done = generate(3, tiny_store_path, "--parallel", "tensor", "--link-loss", "7:0.1")
    assert done.returncode == 2
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    assert lines == ["halo-mpi: error: --link-loss names rank 7, but the workers are ranks 1..2"], done.stderr


def test_missing_weights_on_every_rank(tmp_path):
    done = generate(2, tmp_path / "none.h5", "--parallel", "tensor")
    assert done.returncode == 2 and done.stderr.count("halo-mpi: error:") == 1, done.stderr


def test_interrupt_on_a_worker_ends_every_rank(tiny_store_path):
    mark = uuid.uuid4().hex
    with launched(strict_lossy_run(tiny_store_path), env={**os.environ, "HALO_TEST_MARK": mark}) as proc:
        pid = wait_for_rank(mark, 1, proc)
        wait_until_generating(proc)             # (30% loss: the run takes minutes)
        os.kill(pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)  # every rank ends (the timeout: a hang, not a pace)
    assert proc.returncode != 0
    assert err.count("halo-mpi: interrupted on rank 1") == 1, err


@pytest.mark.slow
def test_a_frozen_unstable_worker_does_not_stall_halo(real_store_path, tmp_path):
    """SIGSTOP of the unstable rank for 3 s on MPICH's shared-memory path: before, rank 0's
    send pool filled up with messages to the frozen rank and every token waited for it (a 5 s
    freeze cost a 4.9 s token); now no token takes more than a second and the run completes."""
    mark = uuid.uuid4().hex
    stats = tmp_path / "s.json"
    cmd = halo_cmd("generate", "--weights", real_store_path, "--parallel", "tensor", "--sync", "halo",
                   "--link-loss", "2:0.05", "--prompt", "Once upon a time", "--max-new-tokens", 64,
                   "--ignore-eos", "--temperature", 0, "--stats-json", stats, ranks=3)
    with launched(cmd, env={**os.environ, "HALO_TEST_MARK": mark}) as proc:
        pid = wait_for_rank(mark, 2, proc)
        wait_until_generating(proc)                   # loaded and decoding: frozen mid-decode
        os.kill(pid, signal.SIGSTOP)
        time.sleep(3.0)
        os.kill(pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    decode = json.loads(stats.read_text())["decode_ms"]
    assert len(decode) == 63 and max(decode) < 1000, sorted(decode)[-5:]


def test_progress_lines_show_tokens_per_second_and_link_rates(tiny_store_path):
    done = generate(2, tiny_store_path, "--parallel", "tensor", "--sync", "halo", "--link-loss", "1:0.05",
                    "--progress", "0.000001", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 5 and "tokens/s" in lines[-1] and "on-time rank:rate 1:" in lines[-1]


def test_a_short_soak_neither_hangs_nor_grows(tiny_store_path, tmp_path):
    """HALO at 5% emulated loss on two of three workers for 1000 tokens (4 prompts in a row: the
    tiny model's context is 256; the README's soak runs the real model): no hang, no request
    pending at the end, and each rank's resident memory at its last sample within 5% of its first."""
    stats = tmp_path / "s.json"
    done = generate(4, tiny_store_path, "--parallel", "tensor", "--sync", "halo",
                    "--link-loss", "2:0.05,3:0.05", "--max-new-tokens", "1000", "--ignore-eos",
                    "--prompt", "a", "--prompt", "b", "--prompt", "c", "--stats-json", str(stats),
                    timeout=300)
    assert done.returncode == 0, done.stderr
    s = json.loads(stats.read_text())
    assert s["tokens"] >= 1000 and s["pending_requests_at_end"] == 0
    traces = [r["rss_mb_trace"] for r in s["ranks"]]
    assert all(len(t) >= 2 for t in traces), traces
    for t in traces:
        assert t[-1][1] <= 1.05 * t[0][1], t


def test_ctrl_c_on_mpiexec_prints_one_line(tiny_store_path):
    """Ctrl-C reaches every rank through mpiexec: the user reads rank 0's line only."""
    with launched(strict_lossy_run(tiny_store_path)) as proc:
        wait_until_generating(proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("halo-mpi: interrupted") == 1 and "halo-mpi: interrupted on rank 0" in err, err


@pytest.mark.parametrize("sync", ["strict", "halo"])
def test_prompts_batched_in_tensor_mode_print_what_one_at_a_time_prints(tiny_store_path, tmp_path, sync):
    """generate --parallel tensor with three prompts at -n 2: batched (--max-batch 8, each
    sequence printed whole as it finishes) the same texts as one at a time (--max-batch 1)."""
    args = ("--parallel", "tensor", "--sync", sync, "--wire-dtype", "float32", "--prompt", "once",
            "--prompt", "the cat")
    one = generate(2, tiny_store_path, *args, "--max-batch", 1)
    many = generate(2, tiny_store_path, *args, "--max-batch", 8, "--stats-json", tmp_path / "s.json")
    assert one.returncode == 0 and many.returncode == 0, many.stderr
    texts = dict(line[1:].split("] ", 1) for line in many.stdout.splitlines())    # "[i] text"
    assert [texts[str(i)] for i in range(3)] == one.stdout.splitlines()
    stats = json.loads((tmp_path / "s.json").read_text())
    assert max(stats["step_batch"]) == 3 and "steps of up to 3 sequences" in many.stderr
