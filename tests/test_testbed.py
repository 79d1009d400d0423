"""The lossy-network testbed: real namespaces, kernel packet drops, MPI over TCP.

Tests that build a testbed need root, `ip` and iptables; without them they skip and say why.
Every subprocess has a timeout, and every testbed is removed by its fixture or context manager.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import halo, halo_cmd

from halo_mpi.cli.testbed import add_parser
from halo_mpi.errors import HaloError
from halo_mpi.net.ranks import parse_rank_values
from halo_mpi.testbed import bed as testbed
from halo_mpi.testbed import netns
from halo_mpi.testbed.bed import PREFIX, is_stale
from halo_mpi.testbed.delays import ENGINE_MESSAGE, measure_delays, summarize

PY = sys.executable
PROMPT = "The capital of France is"


def why_no_testbed() -> str | None:
    """Why testbeds cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "testbed tests need root (network namespaces and iptables rules)"
    try:
        netns.require_tools()
    except HaloError as e:
        return str(e)
    probe = f"{PREFIX}-probe{os.getpid()}"
    try:           # in a container without CAP_NET_ADMIN this is where it fails
        netns.add_namespace(probe)
    except HaloError as e:
        return f"cannot create a network namespace here: {e}"
    finally:
        netns.delete_namespace(probe)
    return None


@pytest.fixture(scope="module")
def root_testbed():
    reason = why_no_testbed()
    if reason:
        pytest.skip(reason)


def root_snapshot() -> dict:
    """The root namespace's links, rules and qdiscs: a testbed must never change them."""
    return {"links": sorted(netns.links()), "rules": netns.iptables_rules(), "qdiscs": netns.qdiscs()}


def assert_removed(name: str, before: dict):
    assert not [n for n in netns.namespaces() if n.startswith(f"{PREFIX}-{name}-")]
    assert not os.path.exists(testbed.Testbed(2, name=name).state_path)
    assert root_snapshot() == before


def tb_cli(*args) -> list[str]:
    return halo_cmd("testbed", *args)


def unique(tag: str) -> str:
    return f"{tag}{os.getpid() % 10000}"


# ---------------------------------------------------------------------------------------------
# without root: options and errors

def test_parse_rank_values():
    assert parse_rank_values("1:0.05, 3:0.1", "--loss") == {1: 0.05, 3: 0.1}
    assert parse_rank_values(None, "--loss") == {}
    with pytest.raises(HaloError, match="RANK:VALUE"):
        parse_rank_values("1=0.05", "--loss")


@pytest.mark.parametrize("kwargs, message", [
    (dict(ranks=1), "2 to"),
    (dict(ranks=2, loss={2: 0.1}), "ranks 0..1"),
    (dict(ranks=2, loss={1: 1.0}), r"\[0, 1\)"),
    (dict(ranks=2, rate={1: 0}), "positive"),
    (dict(ranks=2, name="Bad-Name"), "lower-case"),
    (dict(ranks=2, rto_min_ms=500), r"\(0, 200\]"),
])
def test_bad_spec_is_one_clear_error(kwargs, message):
    with pytest.raises(HaloError, match=message):
        testbed.Testbed(**kwargs)


def test_not_root_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(HaloError, match="needs root"):
        testbed.Testbed(2, {1: 0.1}).up()


def test_missing_iptables_says_how_to_install(monkeypatch, tmp_path):
    for name in ("ip", "tc"):            # a PATH with iproute2 but no iptables
        (tmp_path / name).symlink_to("/bin/true")
    monkeypatch.setattr(netns, "SBIN_PATH", str(tmp_path))
    with pytest.raises(HaloError, match="apt-get install -y iptables"):
        netns.require_tools()


def test_cli_actions_parse():
    import argparse
    p = argparse.ArgumentParser(prog="halo-mpi")
    add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["testbed", "up", "--ranks", "3", "--loss", "1:0.1", "--name", "x"])
    assert (a.ranks, a.loss, a.name, a.func.__name__) == (3, "1:0.1", "x", "cmd_up")
    a = p.parse_args(["testbed", "run", "--ranks", "2", "--", "generate", "--parallel", "tensor"])
    assert a.command == ["--", "generate", "--parallel", "tensor"] and a.func.__name__ == "cmd_run"
    for action in ("down", "status", "delays"):
        assert p.parse_args(["testbed", action]).func.__name__ == f"cmd_{action}"


# ---------------------------------------------------------------------------------------------
# up / down leave nothing behind

def test_up_down_leaves_nothing(root_testbed):
    before = root_snapshot()
    name = unique("ud")
    with testbed.Testbed(3, {1: 0.1, 2: 0.05}, {2: 50.0}, name=name) as tb:
        assert set(tb.namespaces()) <= set(netns.namespaces())
        assert sorted(netns.links(tb.hub)) == ["hbr", "lo", "v0", "v1", "v2"]
        assert sorted(netns.links(tb.namespace(1))) == ["halo0", "lo"]
        assert sorted(netns.drop_counts(tb.namespace(1))) == ["from-r2", "to-r1"]
        assert sorted(netns.drop_counts(tb.namespace(0))) == ["from-r1", "from-r2"]
        assert any("tbf" in q for q in netns.qdiscs(tb.namespace(2)))
        assert any("tbf" in q and "v2" in q for q in netns.qdiscs(tb.hub))
        assert tb.drop_counters() == {1: 0, 2: 0}
        assert json.load(open(tb.state_path))["loss"] == {"1": 0.1, "2": 0.05}
        tb.set_loss({1: 0.2})
        assert sorted(netns.drop_counts(tb.namespace(0))) == ["from-r1"]
    assert_removed(name, before)


def test_exception_inside_the_context_manager_cleans_up(root_testbed):
    before = root_snapshot()
    name = unique("ex")
    with pytest.raises(RuntimeError, match="boom"):
        with testbed.Testbed(2, {1: 0.1}, name=name):
            raise RuntimeError("boom")
    assert_removed(name, before)


def test_failing_run_cleans_up(root_testbed, tmp_path):
    """A run whose command exits non-zero: the exit code comes back, the testbed goes."""
    before = root_snapshot()
    name = unique("fr")
    done = subprocess.run(tb_cli("run", "--ranks", "2", "--loss", "1:0.1", "--name", name, "--",
                                      "generate", "--parallel", "tensor", "--weights",
                                      str(tmp_path / "missing.h5"), "--prompt", "x"),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "missing.h5" in done.stderr
    assert_removed(name, before)


def state_says_up(path: str) -> bool:
    """Whether a testbed's state file says it is up; an empty one is a testbed being made (its
    name is claimed with an empty file, then the state written whole: bed.claim_state)."""
    try:
        with open(path) as f:
            return json.load(f)["is_up"]
    except (OSError, ValueError):
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_cleans_up(root_testbed, tiny_store_path, sig):
    """Ctrl-C or SIGTERM during a run: ranks end, namespaces, rules and state file go."""
    before = root_snapshot()
    name = unique("ir" if sig == signal.SIGINT else "it")
    proc = subprocess.Popen(
        tb_cli("run", "--ranks", "2", "--loss", "1:0.3", "--name", name, "--", "generate",
                    "--parallel", "tensor", "--sync", "strict", "--weights", str(tiny_store_path),
                    "--prompt", PROMPT, "--max-new-tokens", "200", "--temperature", "0", "--quiet"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if our shell ignores it
    try:
        state = testbed.Testbed(2, name=name).state_path
        deadline = time.monotonic() + 60
        while not state_says_up(state):
            assert time.monotonic() < deadline and proc.poll() is None, "the testbed did not come up"
            time.sleep(0.2)
        seen, line = [], ""
        while "tensor-parallel on 2 ranks" not in line:     # the ranks are set up: rank 0's plan
            line = proc.stderr.readline()
            seen.append(line)
            assert line or proc.poll() is None, "the run ended before its plan"
        assert proc.poll() is None
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        err = "".join(seen) + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
            testbed.Testbed(2, name=name).down()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert_removed(name, before)


def test_killed_run_is_stale_and_removable(root_testbed):
    """A run killed with SIGKILL cannot clean up: status calls it stale, down removes it."""
    before = root_snapshot()
    name = unique("st")
    script = (f"from halo_mpi.testbed import bed; import time; "
              f"tb = bed.Testbed(2, {{1: 0.1}}, name={name!r}).up(); "
              f"print('up', flush=True); time.sleep(120)")
    proc = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        proc.kill()
        proc.wait(10)
        tb = testbed.Testbed.load(name)
        assert is_stale(tb)
        status = subprocess.run(tb_cli("status", "--name", name), capture_output=True, text=True,
                                timeout=60)
        assert "stale" in status.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(tb_cli("down", "--name", name), capture_output=True, timeout=60)
    assert_removed(name, before)


# ---------------------------------------------------------------------------------------------
# MPI over the lossy links

def reference_text(store, max_new: int) -> str:
    done = halo("generate", "--weights", store, "--prompt", PROMPT, "--max-new-tokens", max_new,
                "--temperature", 0, "--quiet", timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def strict_on_testbed(store, max_new: int, loss: float, timeout: float):
    """(stdout, dropped packets) of strict tensor-parallel generation with loss on rank 1."""
    with testbed.Testbed(2, {1: loss}, name=unique("gen")) as tb:
        assert tb.drop_counters() == {1: 0}
        done = tb.run(["generate", "--parallel", "tensor", "--sync", "strict", "--weights", str(store),
                       "--prompt", PROMPT, "--max-new-tokens", str(max_new), "--temperature", "0",
                       "--quiet"], capture=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout, tb.drop_counters()[1]


def test_strict_run_under_20_percent_loss_matches_single_process(root_testbed, tiny_store_path):
    expected = reference_text(tiny_store_path, 8)
    text, dropped = strict_on_testbed(tiny_store_path, 8, 0.2, timeout=300)
    assert dropped > 0, "no packet was dropped: MPI traffic did not cross the lossy interface"
    assert text == expected


@pytest.mark.slow
def test_real_model_strict_under_5_percent_loss_matches_single_process(root_testbed, real_store_path):
    """SmolLM2 over a 5% lossy link (20% makes each of its 30 layers wait ~0.2-2 s per token)."""
    expected = reference_text(real_store_path, 4)
    text, dropped = strict_on_testbed(real_store_path, 4, 0.05, timeout=300)
    assert dropped > 0
    assert text == expected


def test_pingpong_shows_retransmission_stalls_at_5_percent(root_testbed):
    """Real kernel TCP under 5% loss: most messages arrive in well under a millisecond, the
    tail waits for a retransmission (a 200 ms RTO, or a few ms for a tail-loss probe)."""
    result = measure_delays(None, [ENGINE_MESSAGE], 0.05, count=300, warmup=10)
    samples = result["sizes"][str(ENGINE_MESSAGE)]
    one_way = summarize(samples["forward_ms"] + samples["back_ms"])
    assert result["drops"] > 0
    assert one_way["n"] == 600
    assert one_way["median"] < 5.0, one_way
    assert one_way["p99"] > 100.0 and one_way["p99"] > 20 * one_way["median"], one_way


def test_rto_min_shortens_the_retransmission_stalls(root_testbed):
    """`--rto-min 20`: every rank's route carries rto_min, and the 5%-loss tail that waits for
    Linux's 200 ms timeout waits ~20-40 ms instead (measured: p99 rtt 36 ms against ~200)."""
    with testbed.Testbed(2, {1: 0.0}, name=unique("rt"), rto_min_ms=20) as tb:
        assert all("rto_min lock 20ms" in " ".join(netns.routes(tb.namespace(r))) for r in (0, 1))
        result = measure_delays(tb, [ENGINE_MESSAGE], 0.05, count=300, warmup=10)
    samples = result["sizes"][str(ENGINE_MESSAGE)]
    one_way = summarize(samples["forward_ms"] + samples["back_ms"])
    assert result["drops"] > 0 and one_way["p99"] < 100.0, one_way


def test_measure_delays_on_a_given_testbed_replaces_its_loss(root_testbed):
    with testbed.Testbed(2, {1: 0.0}, name=unique("md")) as tb:
        result = measure_delays(tb, [1024, 8192], 0.0, count=20, warmup=2)
        assert result["drops"] == 0 and result["loss"] == 0.0
        assert sorted(result["sizes"]) == ["1024", "8192"]
        assert all(len(v) == 20 for s in result["sizes"].values() for v in s.values())
        assert summarize(result["sizes"]["1024"]["rtt_ms"])["median"] < 50
