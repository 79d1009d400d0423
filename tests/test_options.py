"""The option tree (halo_mpi/options/): parsed once into typed values, written back to the same
words, declared once for every subcommand and the bench."""
import argparse
import dataclasses

import pytest

from halo_mpi.cli.main import build_parser
from halo_mpi.cli.options import mode_options
from halo_mpi.errors import HaloError
from halo_mpi.options.flags import add_options, argv, flagged, options_of
from halo_mpi.options.tree import ModeOptions, check
from halo_mpi.options.values import Budget


def parse_mode(words: list[str]) -> ModeOptions:
    p = argparse.ArgumentParser()
    add_options(p, ModeOptions)
    return options_of(ModeOptions, p.parse_args(words))


VARIANTS = [
    ModeOptions(),
    ModeOptions.of(parallel="tensor", sync="strict", wire_dtype="q8", link_loss={2: 0.05, 3: 0.1},
                   unstable_ranks=frozenset({1, 3}), critical_share=0.45, deadline_factor=2.25,
                   deadline_margin_ms=0.5, sparsity=0.25, drop_budget=0.02, spin_us=0.0, no_replan=True,
                   placement="random", loss_model="rto", seed=7, threads=1, dtype="bfloat16"),
    ModeOptions.of(parallel="tensor", backup_share=1.0, rank_timeout=2.5, prefill_chunk=8,
                   device_profile="cluster.toml", weights="shards/m.rank{rank}.h5"),
    ModeOptions.of(parallel="pipeline", num_sequences=5, mem_budget=Budget.parse("150MB"),
                   load_dir="/tmp/x", prefetch="off", loader="thread", read_mbps=40.0, cold=True),
    ModeOptions.of(mem_budget=Budget.parse(" 25 % "), prefetch="on"),
]


@pytest.mark.parametrize("options", VARIANTS)
def test_typed_options_round_trip_through_their_words(options):
    assert parse_mode(argv(options)) == options


def test_every_field_has_a_flag_of_its_own():
    names = [flag.name for _, _, flag in flagged(ModeOptions)]
    assert len(names) == len(set(names))
    paths = {path for path, _, _ in flagged(ModeOptions)}
    assert {"load.mem_budget", "tensor.sync", "pipeline.num_sequences", "threads"} <= paths


@pytest.mark.parametrize("command", ["generate", "evaluate", "serve"])
def test_every_mode_command_takes_every_mode_option_alike(command):
    """One declaration: each subcommand parses the same words into the same typed options."""
    extra = {"generate": ["--prompt", "x"], "evaluate": [], "serve": []}[command]
    for options in VARIANTS:
        a = build_parser().parse_args([command, *argv(options), *extra])
        assert mode_options(a) == options


def test_values_are_checked_where_they_are_parsed(capsys):
    for words, says in [(["--critical-share", "0"], "must be in (0, 1]"),
                        (["--mem-budget", "150%"], "a share is at most 100%"),
                        (["--link-loss", "2:1.5"], "value 1.5 for rank 2 is not in [0, 1)"),
                        (["--unstable-ranks", "a"], "is not a comma list of ranks"),
                        (["--threads", "-1"], "must be >= 0"),
                        (["--read-mbps", "0"], "must be > 0"),
                        (["--slow", "1:3"], "is not RANK:FACTOR@STEP (e.g. 1:3@20)"),
                        (["--slow", "1:0.5@2"], "FACTOR is at least 1 and finite"),
                        (["--slow", "1:3@1,1:2@5"], "names rank 1 twice")]:
        with pytest.raises(SystemExit):
            parse_mode(words)
        assert says in capsys.readouterr().err


def test_rules_across_options_are_checked_once_the_world_size_is_known():
    check(ModeOptions.of(parallel="tensor", link_loss={3: 0.1}), 4)
    with pytest.raises(HaloError, match="names rank 3, but the workers are ranks 1..1"):
        check(ModeOptions.of(parallel="tensor", link_loss={3: 0.1}), 2)
    with pytest.raises(HaloError, match="choose --parallel tensor or --parallel pipeline"):
        check(ModeOptions(), 2)
    check(ModeOptions.of(parallel="tensor", slow={0: (2.0, 5)}), 2)        # rank 0 may slow down too
    with pytest.raises(HaloError, match="--slow names rank 2, but the ranks are 0..1"):
        check(ModeOptions.of(parallel="tensor", slow={2: (2.0, 5)}), 2)
    with pytest.raises(HaloError, match="not with --mem-budget"):
        check(ModeOptions.of(parallel="tensor", backup_share=0.5, mem_budget=Budget.parse("50%")), 2)
    with pytest.raises(TypeError, match="no option field warp"):
        ModeOptions.of(warp=9)


# ---------------------------------------------------------------------------------------------
# the bench passes typed options to its ranks, in the CLI's own words

def bench_config(*words):
    from halo_mpi.bench.loss import BenchConfig
    a = build_parser().parse_args(["bench", *words])
    return BenchConfig(mode_options(a), a.ranks, a.modes.split(","), [0.0, 0.05], [1], net="emulated")


def test_each_option_the_bench_passes_is_one_the_cli_defines():
    from halo_mpi.bench.loss import MODES, run_options
    cfg = bench_config("--threads", "1", "--wire-dtype", "q8", "--dtype", "bfloat16", "--ranks", "2")
    for mode in MODES:
        for loss in (0.0, 0.05):
            options = run_options(cfg, mode, loss)
            a = build_parser().parse_args(["generate", *argv(options), "--prompt", "x"])
            assert mode_options(a) == options, mode
            assert options.threads == 1 and options.dtype == "bfloat16"    # the sweep keeps --threads
    lossy = run_options(cfg, "halo", 0.05)
    assert lossy.tensor.link_loss == {1: 0.05} and lossy.tensor.wire == "q8"
    testbed = run_options(dataclasses.replace(cfg, net="testbed"), "halo", 0.05)
    assert testbed.tensor.unstable_ranks == {1} and not testbed.tensor.link_loss


def test_the_bench_rank_runner_parses_what_the_bench_writes():
    from halo_mpi.bench.rank import Task, command, parse
    options = VARIANTS[1]
    task = Task("generate", "The history of", 17, out="gen.json")
    words = command(options, task)
    assert words[1:5] == ["-m", "mpi4py", "-m", "halo_mpi.bench.rank"]
    assert parse(words[5:]) == (options, task)


def test_budget_bench_options(tmp_path):
    from halo_mpi.bench.budget import BudgetBench, run_options
    a = build_parser().parse_args(["bench", "--budgets", "50%:no-prefetch", "--cold-reads",
                                   "--read-mbps", "40"])
    cfg = BudgetBench(mode_options(a), ["50%:no-prefetch"], [1, 2])
    one, two = run_options(cfg, 1, "50%:no-prefetch"), run_options(cfg, 2, "50%:no-prefetch")
    assert one.load == dataclasses.replace(cfg.base.load, mem_budget=Budget.parse("50%"), prefetch="off")
    assert one.load.cold and one.load.read_mbps == 40.0 and one.parallel == "none"
    assert two.parallel == "tensor" and two.tensor.sync == "strict"
