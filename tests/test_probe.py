"""The start-up link probe (net/probe.py): the tournament's pairs, which ranks start unstable, and
the survey under mpiexec with emulated loss on one link."""
import itertools

import pytest

from halo_mpi.net.devices import STABLE
from halo_mpi.net.loss import LinkLoss
from halo_mpi.net.probe import LinkSurvey, measure_links, pairings


@pytest.mark.parametrize("size", [2, 3, 4, 5, 8])
def test_every_pair_meets_once_and_no_rank_twice_in_a_round(size):
    rounds = pairings(size)
    met = [pair for pairs in rounds for pair in pairs]
    assert sorted(met) == list(itertools.combinations(range(size), 2))
    for pairs in rounds:
        ranks = [r for pair in pairs for r in pair]
        assert len(ranks) == len(set(ranks))


def survey(size, late):
    """A survey of 32 round trips per pair, `late` {(a, b): late count}."""
    s = LinkSurvey(size)
    for a, b in itertools.combinations(range(size), 2):
        s.counts[(a, b)] = (32 - late.get((a, b), 0), 32)
    return s


def test_clean_links_leave_every_rank_stable():
    assert survey(4, {}).unstable() == {}
    assert "all 6 on time" in survey(4, {}).describe()


def test_two_stalls_in_32_start_unstable_one_may_be_a_busy_machine():
    # 30/32 < STABLE: a link that stalls twice in 32 round trips of a member's message would stall
    # about four all-reduce rounds a token (SmolLM2 has 61); one stall alone was seen from a
    # descheduled rank on a loaded machine (-n 4 on 2 cores)
    assert survey(2, {(0, 1): 2}).unstable() == {1: 30 / 32}
    assert survey(2, {(0, 1): 1}).unstable() == {}


def test_the_rank_behind_the_bad_links_starts_unstable_never_rank_0():
    # rank 2's links to everyone are bad: only rank 2 goes
    assert set(survey(4, {(0, 2): 20, (1, 2): 18, (2, 3): 25}).unstable()) == {2}
    # a bad link between two workers costs one of them (the one whose worst link is worse)
    assert set(survey(3, {(1, 2): 10}).unstable()) == {2}
    assert set(survey(4, {(1, 3): 10, (2, 3): 2}).unstable()) == {3}
    assert set(survey(4, {(1, 3): 10, (2, 3): 1}).unstable()) == {3}
    # a bad link to rank 0 costs the worker, whatever its other links
    assert set(survey(3, {(0, 1): 5}).unstable()) == {1}


def test_a_link_that_never_answered_on_time_keeps_a_floor():
    assert survey(2, {(0, 1): 32}).unstable() == {1: 0.01}


@pytest.mark.mpi(min_size=2)
def test_the_survey_finds_the_lossy_link_and_is_the_same_on_every_rank():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    lossy = comm.Get_size() - 1
    clean = measure_links(comm, 300)
    # 50% emulated loss on one link: a one-segment round trip stalls ~3 times in 4
    bad = measure_links(comm, 300, loss=LinkLoss({lossy: 0.5}, seed=1))
    views = comm.allgather((clean.counts, bad.counts))
    assert all(v == views[0] for v in views)
    assert clean.unstable() == {}, clean.describe()
    assert set(bad.unstable()) == {lossy}, bad.describe()


@pytest.mark.mpi(min_size=2)
def test_a_rank_found_lossy_at_start_is_a_satellite_without_being_named(tiny_store):
    from mpi4py import MPI

    from halo_mpi.model.generate import Sampler, generate
    from halo_mpi.options.tree import ModeOptions
    from halo_mpi.tensor.lead import TensorParallelSession
    from halo_mpi.tensor.plan import make_plan, survey_links
    from halo_mpi.tensor.run import TensorRank
    comm = MPI.COMM_WORLD
    lossy = comm.Get_size() - 1
    # emulated loss on one link, and no rank named unstable: only the probe can tell
    options = ModeOptions.of(parallel="tensor", sync="halo", link_loss={lossy: 0.5},
                             unstable_ranks=frozenset())
    plan = make_plan(tiny_store, comm.Get_size(), options, survey_links(comm, tiny_store, options))
    assert plan.satellites == [lossy] and lossy not in plan.members
    assert plan.policy.unstable == {lossy}
    assert plan.cluster.ranks[lossy].reliability < STABLE
    assert "late" in plan.measured

    def drive(lead, model):
        return generate(TensorParallelSession(model, lead, 24, prefill_chunk=4), [5, 70, 33], 8,
                        Sampler(0.0)).tokens
    tokens, run = TensorRank(comm, tiny_store, plan).run(drive)
    if comm.Get_rank() == 0:
        assert len(tokens) == 8 and not run.lead.silent
