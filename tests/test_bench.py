"""`halo-mpi bench` on a 2-layer synthetic model with emulated loss: a valid results.json."""
import json
import os
import subprocess
import sys

from conftest import halo

RUN_KEYS = {"mode": str, "loss": float, "ms_per_token_median": float, "ms_per_token_p95": float,
            "perplexity": float, "agreement": float, "dropped_share": float, "peak_rss_mb": list,
            "tokens": int}


def test_bench_writes_results_of_the_documented_shape(tiny_store_path, tmp_path):
    out = tmp_path / "bench"
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]     # the venv's mpiexec
    done = halo("bench", "--weights", tiny_store_path, "--ranks", 2, "--modes", "strict,halo", "--loss", 0.05,
                "--tokens", 8, "--warmup", 2, "--eval-tokens", 16, "--net", "emulated", "--wire-dtype", "q8",
                "--out", out, timeout=300, env={"PATH": path})
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads((out / "results.json").read_text())
    assert r["ranks"] == 2 and r["net"] == "emulated" and r["lossy_ranks"] == [1]
    assert isinstance(r["model"], str)
    assert [(x["mode"], x["loss"]) for x in r["runs"]] == [("strict", 0.05), ("halo", 0.05)]
    for run in r["runs"]:
        for key, kind in RUN_KEYS.items():
            assert isinstance(run[key], kind), (key, run[key])
        assert len(run["peak_rss_mb"]) == 2 and run["tokens"] == 8
        assert 0 <= run["dropped_share"] <= 1 and 0 <= run["agreement"] <= 1
    strict = r["runs"][0]
    assert strict["agreement"] == 1.0 and strict["dropped_share"] == 0.0   # strict is exact
    assert all(run["wire"] == "q8" and run["x_single"] > 0 for run in r["runs"])
    assert r["single_ms_per_token_median"] > 0
    assert "| halo | q8 | 0.05 |" in (out / "results.md").read_text()


def test_bench_rejects_unknown_modes(capsys):
    from halo_mpi.cli.main import main
    assert main(["bench", "--modes", "warp", "--weights", "x.h5"]) == 2
    assert "unknown bench modes ['warp']" in capsys.readouterr().err


def test_the_scaling_script_runs_every_configuration_and_prints_one_table(deep_store_path, tmp_path):
    """jobs/scaling.sh on the 8-layer synthetic store, 2 ranks, 4 tokens: every run and the table
    (the 16-core figures come from the same script on the device machine)."""
    from conftest import ROOT
    env = {**os.environ, "STORE": str(deep_store_path), "RANKS": "2", "TOKENS": "4",
           "OUT": str(tmp_path), "PYTHON": sys.executable,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    done = subprocess.run(["bash", str(ROOT / "jobs" / "scaling.sh")], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    order = ["single-1x1", "single-1x4", "strict-2x1", "strict-4x4", "halo-2x1", "halo-4x4",
             "halo-4x4-loss5", "pipeline-4x4-s4"]
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == sorted(order)
    rows = [line for line in done.stdout.splitlines()
            if line.startswith("| ") and "ranks x threads" not in line]
    assert [row.split("|")[1].strip() for row in rows] == order
    assert all(float(row.split("|")[3]) > 0 for row in rows)


def test_bench_batch_reports_each_b_in_one_process_and_on_the_ring(tiny_store_path, tmp_path):
    rows_path = tmp_path / "batch.json"
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]     # the venv's mpiexec
    done = halo("bench", "--batch", "1,2,4", "--batch-modes", "single,pipeline", "--weights", tiny_store_path,
                "--tokens", 3, "--warmup", 1,
                "--repeat", 2, "--out", tmp_path, "--json", rows_path, "--threads", 1, timeout=300,
                env={"PATH": path})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(rows_path.read_text())
    single = [r for r in rows if r["mode"] == "single"]
    assert [r["batch"] for r in single] == [1, 2, 4] and all(r["steps"] == 6 for r in single)
    for r in single:
        assert r["tokens_per_s"] > 0 and r["ms_per_token_per_sequence"] == r["ms_per_step_median"]
    assert single[0]["step_vs_first"] == 1.0
    ring = [r for r in rows if r["mode"] == "pipeline"]
    assert [(r["batch"], r["in_flight"], r["ranks"]) for r in ring] == [(1, 2, 2), (2, 4, 2), (4, 8, 2)]
    for r in ring:      # 2 runs x 2B sequences x 3 timed gaps each
        assert r["tokens"] == 2 * r["in_flight"] * 3 and r["tokens_per_s"] > 0
        assert max(map(int, r["steps_by_batch"])) <= r["batch"] and r["ms_per_step_median"] > 0
        assert len(r["stage_ms_per_step"]) == 2 and r["threads_per_rank"] == 1
    assert "B=4" in done.stdout and "pipeline -n 2" in done.stdout


def test_bench_batch_times_tensor_mode_under_mpiexec(tiny_store_path, tmp_path):
    rows_path = tmp_path / "batch.json"
    done = halo("bench", "--batch", "1,2", "--batch-modes", "strict,halo", "--weights", tiny_store_path,
                "--tokens", 3, "--warmup", 1, "--repeat", 1, "--out", tmp_path, "--json", rows_path,
                "--threads", 1, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(rows_path.read_text())
    assert [(r["mode"], r["batch"]) for r in rows] == [("tensor strict -n 2", 1), ("tensor strict -n 2", 2),
                                                       ("tensor halo -n 2", 1), ("tensor halo -n 2", 2)]
    assert all(r["steps"] == 3 and r["tokens_per_s"] > 0 for r in rows)


def test_bench_batch_refuses_a_bad_list(tiny_store_path):
    done = halo("bench", "--batch", "0,2", "--weights", tiny_store_path, timeout=120)
    assert done.returncode != 0 and "--batch" in done.stderr and "Traceback" not in done.stderr
