"""Links that change during a run: loss schedules (emulated and on the testbed), `testbed set`, and
the changing-loss bench scenario (its figures from synthetic records; a short run on the tiny
model). No test depends on wall time: schedules are driven by steps or by a count the test sets.
"""
import json
import os
import sys

import pytest
from conftest import halo
from test_testbed import unique, why_no_testbed

from halo_mpi.bench.changing_loss import Progress, error_line, progress_records
from halo_mpi.bench.recovery import figures, format_figures, tokens_to_recover
from halo_mpi.errors import HaloError
from halo_mpi.net.loss import LinkLoss, loss_at
from halo_mpi.net.ranks import parse_rank_schedule
from halo_mpi.options.tree import ModeOptions
from halo_mpi.options.values import format_link_losses, link_losses
from halo_mpi.testbed import bed, netns
from halo_mpi.testbed.change import LossSchedule, change_links

SCHEDULE = "2:0@0,2:0.5@50,2:0.3@100,2:0@150"


@pytest.fixture(scope="module")
def root_testbed():
    reason = why_no_testbed()
    if reason:
        pytest.skip(reason)


# ---------------------------------------------------------------------------------------------
# schedules: parsing

def test_link_loss_takes_a_schedule_and_gives_it_back():
    parse = link_losses("--link-loss")
    got = parse(SCHEDULE + ",1:0.05")
    assert got == {2: ((0, 0.0), (50, 0.5), (100, 0.3), (150, 0.0)), 1: 0.05}
    assert parse(format_link_losses(got)) == got
    assert parse("2:0.05,3:0.1") == {2: 0.05, 3: 0.1}          # the plain form is unchanged
    assert parse("2:0.1@0") == {2: 0.1}                        # one change at 0: a fixed loss


def test_a_scheduled_loss_names_its_rank_unstable_as_a_fixed_one_does():
    scheduled = ModeOptions.of(parallel="tensor", link_loss=link_losses("--link-loss")(SCHEDULE))
    fixed = ModeOptions.of(parallel="tensor", link_loss={2: 0.1})
    assert scheduled.tensor.unstable == fixed.tensor.unstable


@pytest.mark.parametrize("spec, message", [
    ("2:0.1@x", "--link-loss item '2:0.1@x' is not RANK:VALUE@AT (e.g. 2:0.1@50)"),
    ("2:1.5@10", "--link-loss value 1.5 for rank 2 is not in [0, 1)"),
    ("2:0.1@5,2:0.2@5", "--link-loss names rank 2 twice at 5"),
    ("2:0.1@-3", "--link-loss item '2:0.1@-3': AT is a finite number >= 0"),
])
def test_bad_link_loss_schedule_is_one_line_naming_the_option(spec, message):
    with pytest.raises(HaloError) as e:
        link_losses("--link-loss")(spec)
    assert str(e.value) == message


def test_bad_link_loss_schedule_on_the_command_line(capsys):
    from halo_mpi.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(["generate", "--parallel", "tensor", "--link-loss", "2:0.1@soon", "--prompt", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--link-loss" in err[0] and "RANK:VALUE@AT" in err[0], err


def test_testbed_schedules_are_in_seconds():
    assert parse_rank_schedule("2:0.1@20s,2:0@40.5s", "--loss-schedule", unit="s") == \
        {2: ((20.0, 0.1), (40.5, 0.0))}
    with pytest.raises(HaloError, match=r"--loss-schedule item '2:0.1@20' is not RANK:VALUE@ATs"):
        parse_rank_schedule("2:0.1@20", "--loss-schedule", unit="s")


def test_testbed_set_and_loss_schedule_parse():
    import argparse

    from halo_mpi.cli.testbed import add_parser
    p = argparse.ArgumentParser(prog="halo-mpi")
    add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["testbed", "set", "--name", "x", "--loss", "2:0.3", "--rate", "1:0"])
    assert (a.name, a.loss, a.rate, a.func.__name__) == ("x", "2:0.3", "1:0", "cmd_set")
    a = p.parse_args(["testbed", "run", "--ranks", "3", "--loss-schedule", "2:0.1@5s", "--", "generate"])
    assert a.loss_schedule == "2:0.1@5s" and a.func.__name__ == "cmd_run"


# ---------------------------------------------------------------------------------------------
# the emulation: the loss in force at a message's step

def test_loss_at_follows_the_schedule():
    s = ((10, 0.1), (20, 0.3), (30, 0.0))
    assert [loss_at(s, step) for step in (0, 9, 10, 19, 20, 29, 30, 99)] == [0, 0, 0.1, 0.1, 0.3, 0.3, 0, 0]
    assert loss_at(0.05, 7) == 0.05


def test_link_loss_changes_at_the_given_steps():
    """p = 0.5 delays every one-segment message (stall 2.8 p^2 + fast 0.7 p > 1); p = 0 none."""
    loss = LinkLoss(link_losses("--link-loss")(SCHEDULE), seed=3)
    delays = {step: [loss.delay(0, 2, 1000, step) for _ in range(20)] + [loss.delay(2, 0, 1000, step)]
              for step in (0, 49, 50, 99, 149, 150, 400)}
    for step in (0, 49, 150, 400):
        assert delays[step] == [0.0] * 21, step
    assert all(d > 0 for d in delays[50] + delays[99])
    assert sum(d > 0 for d in delays[149]) >= 5                       # 0.3: some delayed
    assert LinkLoss({1: 0.5}).delay(0, 2, 1000, 60) == 0.0            # another link: untouched


# ---------------------------------------------------------------------------------------------
# the scenario's figures, from synthetic records

def test_figures_of_a_synthetic_run():
    ms = ([500, 400] + [20.0] * 8 + [40.0] * 10 + [900.0, 30.0] + [60.0] * 8
          + [50, 40, 30, 25, 22] + [21.0] * 5)
    starts, losses = [0, 10, 20, 30], [0.0, 0.1, 0.3, 0.0]
    f = figures(ms, starts, losses, warmup=2)
    assert f["max_ms"] == 900.0 and f["max_ms_all"] == 900.0 and f["tokens_over_1s"] == 0
    assert [p["median_ms"] for p in f["phases"]] == [20.0, 40.0, 60.0, 21.5]
    assert [p["tokens"] for p in f["phases"]] == [10, 10, 10, 10]
    assert f["loss_free_median_ms"] == 20.0 and f["loss_end_token"] == 30
    # medians of 5 tokens from token 30: 30, from 31: 25, from 32: 22 <= 1.2 x 20
    assert f["tokens_to_recover"] == 2
    assert figures(ms, starts, losses, warmup=0)["max_ms"] == 900.0
    assert figures([10.0] * 5 + [99.0] * 5, [0, 5], [0.0, 0.2])["tokens_to_recover"] is None  # never ends
    assert tokens_to_recover([30.0] * 10, 0, 20.0) is None                                 # never back


def test_figures_of_a_run_stopped_before_the_loss_ended():
    f = figures([10.0, 10.0, 10.0, 900.0, 2000.0], [0, 3, 10], [0.0, 0.3, 0.0])
    assert [p["tokens"] for p in f["phases"]] == [3, 2, 0] and f["phases"][2]["median_ms"] is None
    assert f["loss_end_token"] is None and f["tokens_to_recover"] is None and f["tokens_over_1s"] == 1
    assert "did not reach the loss's end" in format_figures(f)


def test_a_warm_up_token_over_1s_is_left_out_of_the_max():
    f = figures([1500.0] + [20.0] * 9, [0, 5], [0.0, 0.1], warmup=1)
    assert f["max_ms"] == 20.0 and f["max_ms_all"] == 1500.0 and f["tokens_over_1s"] == 0


def test_a_run_stopped_short_is_timed_from_its_progress_file(tmp_path):
    progress = Progress(str(tmp_path / "progress"))
    assert progress() == 0
    (tmp_path / "progress").write_text("5\n7\n9\n11\n")
    assert progress() == 4 and len(progress.times) == 4
    progress.times = [10.0, 10.1, 10.35, 10.45]          # when each token was seen
    records = progress_records(progress, [0, 2], [0.0, 0.1])
    assert [round(r["ms"], 6) for r in records] == [100.0, 250.0, 100.0]
    assert [r["loss"] for r in records] == [0.0, 0.0, 0.1]


def test_a_failed_job_is_told_by_its_own_error_line():
    stderr = "tokens...\nhalo-mpi: error on rank 0: rank 2 silent for 60 s\nMPICH: Builtin communicator\n"
    assert error_line(stderr) == "halo-mpi: error on rank 0: rank 2 silent for 60 s"
    assert error_line("a\nlast words\n") == "last words" and error_line("") == "no output"
    raised = ("Traceback (most recent call last):\n  File x\nhalo_mpi.net.liveness.RankSilent: rank 2 "
              "silent for 60 s\nAbort(1) on node 0 (rank 0 in comm 0): application called MPI_Abort\n")
    assert error_line(raised) == "halo_mpi.net.liveness.RankSilent: rank 2 silent for 60 s"


# ---------------------------------------------------------------------------------------------
# the scenario on the emulation, tiny model

def test_changing_loss_scenario_on_the_emulation(tiny_store_path, tmp_path):
    out = tmp_path / "cl"
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]     # the venv's mpiexec
    done = halo("bench", "--scenario", "changing-loss", "--weights", tiny_store_path, "--ranks", 3,
                "--net", "emulated", "--phases", "0,0.3,0", "--phase-tokens", "4,4,6", "--warmup", 1,
                "--out", out, timeout=120, env={"PATH": path})
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads((out / "changing-loss.json").read_text())
    assert r["starts"] == [0, 4, 8] and r["planned_starts"] == [0, 4, 8] and r["lossy_ranks"] == [2]
    records = r["records"]
    assert [x["token"] for x in records] == list(range(14))
    assert [x["loss"] for x in records] == [0.0] * 4 + [0.3] * 4 + [0.0] * 6
    steps = [x["step"] for x in records]
    assert steps == list(range(steps[0], steps[0] + 14))
    for x in records:
        assert x["ms"] > 0 and 0 <= x["dropped_share"] <= 1
        assert set(x["mlp_share"]) == {"0", "1", "2"} and abs(sum(x["mlp_share"].values()) - 1) < 1e-9
    f = r["figures"]
    assert [p["loss"] for p in f["phases"]] == [0.0, 0.3, 0.0] and f["loss_end_token"] == 8
    assert f["max_ms"] == max(x["ms"] for x in records[1:])
    assert "phase 1: loss 0.3 from token 4" in done.stdout
    assert (out / "changing-loss.png").stat().st_size > 0


def test_bad_phase_tokens_is_one_line(capsys):
    from halo_mpi.cli.main import main
    assert main(["bench", "--scenario", "changing-loss", "--phases", "0,0.1", "--phase-tokens", "3,3,3",
                 "--net", "emulated", "--weights", "x.h5"]) != 0
    assert "--phase-tokens gives 3 lengths for 2 --phases" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the testbed (root): rules replaced while it is up

def rule_lines(tb, rank: int) -> list[str]:
    return [line for line in netns.iptables_rules(tb.namespace(rank)) if netns.DROP_COMMENT in line]


def test_testbed_set_replaces_a_ranks_rules_in_place(root_testbed):
    with bed.Testbed(3, {}, name=unique("set")) as tb:
        change_links(tb, {2: 0.1})
        assert [len(rule_lines(tb, r)) for r in range(3)] == [1, 1, 1]
        assert "0.1000" in rule_lines(tb, 2)[0] and "to-r2" in rule_lines(tb, 2)[0]
        assert "198.18.0.3" in rule_lines(tb, 0)[0] and "from-r2" in rule_lines(tb, 0)[0]
        change_links(tb, {2: 0.3})                   # in place: still one rule each, the new value
        assert [len(rule_lines(tb, r)) for r in range(3)] == [1, 1, 1]
        assert all("0.2999" in rule_lines(tb, r)[0] for r in range(3))
        assert json.load(open(tb.state_path))["loss"] == {"2": 0.3}
        change_links(tb, rate={1: 20.0})
        assert any("tbf" in q for q in netns.qdiscs(tb.namespace(1)))
        change_links(tb, {2: 0.0}, {1: 0.0})
        assert [rule_lines(tb, r) for r in range(3)] == [[], [], []]
        assert not any("tbf" in q for q in netns.qdiscs(tb.namespace(1)))
        assert json.load(open(tb.state_path))["loss"] == {"2": 0.0} and tb.rate == {}


def test_testbed_set_and_status_on_the_command_line(root_testbed):
    name = unique("cli")
    assert halo("testbed", "up", "--ranks", "3", "--name", name, timeout=60).returncode == 0
    try:
        done = halo("testbed", "set", "--name", name, "--loss", "2:0.2", timeout=60)
        assert done.returncode == 0 and "loss rank 2: 0.2" in done.stdout, done.stderr
        assert "loss rank 2: 0.2" in halo("testbed", "status", "--name", name, timeout=60).stdout
        bad = halo("testbed", "set", "--name", name, "--loss", "7:0.2", timeout=60)
        assert bad.returncode != 0 and bad.stderr.strip() == \
            "halo-mpi: error: --loss names ranks [7]; this testbed has ranks 0..2"
    finally:
        halo("testbed", "down", "--name", name, timeout=60)


def test_a_loss_schedule_applies_each_change_once_its_count_is_reached(root_testbed):
    """The count is the test's own (no clock): nothing before 5, the 0.2 at 5, both later ones at 12."""
    with bed.Testbed(3, {}, name=unique("sch")) as tb:
        count = [0]
        schedule = LossSchedule.of({2: ((5, 0.2), (10, 0.4), (12, 0.0))})
        assert not schedule.apply_due(tb, 4, lambda: count[0])
        assert rule_lines(tb, 2) == []
        count[0] = 6
        assert schedule.apply_due(tb, 5, lambda: count[0])
        assert "0.2000" in rule_lines(tb, 2)[0]
        assert schedule.applied == [{"at": 5, "rank": 2, "loss": 0.2, "asked_at": 5, "in_place_at": 6}]
        assert schedule.apply_due(tb, 12) and rule_lines(tb, 2) == [] and not schedule.pending
        assert [c["loss"] for c in schedule.applied] == [0.2, 0.4, 0.0]


def test_changing_loss_scenario_on_the_testbed(root_testbed, tiny_store_path, tmp_path):
    """The job's progress drives the changes: each is asked once its phase's start is near and
    recorded with the token from which it was in place (the phases are split there)."""
    out = tmp_path / "tb"
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    done = halo("bench", "--scenario", "changing-loss", "--weights", tiny_store_path, "--ranks", 3,
                "--net", "testbed", "--phases", "0,0.2,0", "--phase-tokens", "6", "--warmup", 1,
                "--out", out, timeout=180, env={"PATH": path})
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads((out / "changing-loss.json").read_text())
    assert [(c["at"], c["rank"], c["loss"]) for c in r["changes"]] == [(0, 2, 0.0), (6, 2, 0.2), (12, 2, 0.0)]
    for c in r["changes"]:
        assert c["in_place_at"] >= c["asked_at"] >= c["at"]
    assert r["starts"] == [0] + [max(c["at"], c["in_place_at"]) for c in r["changes"][1:]]
    assert len(r["records"]) == 18
    assert [x["loss"] for x in r["records"][:6]] == [0.0] * 6
    assert not [n for n in netns.namespaces() if n.startswith(f"{bed.PREFIX}-")
                and n.split("-")[1] not in {t.name for t in bed.testbeds()}]
