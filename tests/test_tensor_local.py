"""Tensor-parallel engine on the single-process twin (ranks as threads, LocalHub transport)."""
import threading
import time

import numpy as np
import pytest
import torch

from halo_mpi.errors import HaloError
from halo_mpi.model.generate import LocalSession, Sampler, generate
from halo_mpi.model.llama import Transformer
from halo_mpi.net.devices import ClusterSpec, Device, read_device_profile
from halo_mpi.net.framing import Kind, json_payload
from halo_mpi.net.links import LinkEstimate
from halo_mpi.net.local import LocalHub
from halo_mpi.net.loss import LinkLoss
from halo_mpi.net.ranks import parse_rank_values
from halo_mpi.options.tree import ModeOptions
from halo_mpi.tensor.held import HeldGroups
from halo_mpi.tensor.local import LocalCluster
from halo_mpi.tensor.placement import Replanner, group_counts, importance_caps, moved, plan
from halo_mpi.tensor.plan import make_plan
from halo_mpi.tensor.policy import SyncPolicy
from halo_mpi.tensor.satellite import Satellite
from halo_mpi.tensor.satellites import Satellites


def reference_run(store, ids, n):
    model = Transformer.from_store(store)
    session = LocalSession(model, len(ids) + n)
    return generate(session, ids, n, Sampler(0.0))


def test_strict_twin_equals_reference(tiny_store):
    ids = [5, 70, 33, 9, 120]
    ref_model = Transformer.from_store(tiny_store)
    ref = ref_model(torch.tensor(ids), ref_model.new_cache(8))
    plan = make_plan(tiny_store, 3, ModeOptions.of(sync="strict"))
    cluster = LocalCluster(tiny_store, plan)
    got = cluster.session(8).step(torch.tensor(ids), decoding=False, last_only=False)
    cluster.stop()
    assert (got - ref).abs().max().item() < 1e-4


# max |logit difference| from the reference, by wire precision (measured on this tiny model:
# float16 2e-5, bfloat16 2e-4, q8 7e-4; the real model, tests/test_tensor_mpi.py: up to 0.8 for q8)
WIRE_TOLERANCE = {"float32": 1e-5, "float16": 2e-4, "bfloat16": 3e-3, "q8": 1e-2}


@pytest.mark.parametrize("wire", sorted(WIRE_TOLERANCE))
def test_strict_twin_with_each_wire_dtype_stays_within_its_tolerance(tiny_store, wire):
    ids = [5, 70, 33, 9, 120, 7, 8, 1, 2, 3]
    ref_model = Transformer.from_store(tiny_store)
    ref = ref_model(torch.tensor(ids), ref_model.new_cache(16))
    plan = make_plan(tiny_store, 3, ModeOptions.of(sync="strict", wire_dtype=wire))
    cluster = LocalCluster(tiny_store, plan)
    got = cluster.session(16).step(torch.tensor(ids), decoding=False, last_only=False)
    cluster.stop()
    err = (got - ref).abs().max().item()
    assert err < WIRE_TOLERANCE[wire]
    if wire != "float32":
        assert err > 1e-7, "a lossy wire dtype that changes nothing was not applied"


def test_halo_twin_without_loss_generates_the_reference_text(tiny_store):
    ids, n = [5, 70, 33], 24
    expected = reference_run(tiny_store, ids, n).tokens
    cluster = LocalCluster(tiny_store, make_plan(tiny_store, 4, ModeOptions.of(sync="halo")))
    result = generate(cluster.session(len(ids) + n), ids, n, Sampler(0.0))
    workers = cluster.stop()
    assert result.tokens == expected
    assert all(r.dropped_share == 0 for r in cluster.lead.records)
    assert sorted(workers) == [1, 2, 3] and cluster.plan.members == [0, 1, 2, 3]


@pytest.mark.parametrize("backup_share", [0.0, 0.5, 1.0])
def test_backup_on_rank_0_makes_up_for_missing_partials(tiny_store, backup_share):
    """Heavy loss on rank 2 (the RTO model: every loss a 200 ms stall). Without backup its missing
    partials are lost importance; with a full backup rank 0 computes them and the text is the
    reference's; half a backup covers the more important half of rank 2's groups."""
    ids, n = [5, 70, 33], 16
    expected = reference_run(tiny_store, ids, n).tokens
    plan = make_plan(tiny_store, 3, ModeOptions.of(sync="halo", link_loss={2: 0.3}, loss_model="rto",
                                                  drop_budget=1.0,   # rank 2 keeps its full share
                     backup_share=backup_share, no_replan=True))
    cluster = LocalCluster(tiny_store, plan, LinkLoss({2: 0.3}, seed=2, model="rto"))
    result = generate(cluster.session(len(ids) + n, prefill_chunk=64), ids, n, Sampler(0.0))
    cluster.stop()
    sats = cluster.lead.satellites
    missed = sum(rec.dropped_ranks[2] for rec in sats.records)
    dropped = sum(rec.dropped_share for rec in sats.records)
    assert missed > 0, "30% loss should have cost rank 2 some partials"
    assert sats.recovered[2] == (missed if backup_share > 0 else 0)
    if backup_share == 1.0:
        assert result.tokens == expected and dropped == pytest.approx(0.0, abs=1e-6)
    else:
        assert dropped > 0
    held = sum(len(m.ids) for (_, r), m in sats.backups.mlps.items() if r == 2)
    assert held == sum(int(np.ceil(backup_share * len(p[2]))) for p in plan.placement)


def test_a_probe_rank_costs_no_quality(tiny_store):
    """A drop budget too small for rank 2's link leaves it one probe group, which rank 0 computes
    as one of its own (rank 2's partial only measures its link): the text is the reference's."""
    ids, n = [5, 70, 33], 16
    expected = reference_run(tiny_store, ids, n).tokens
    plan = make_plan(tiny_store, 3, ModeOptions.of(sync="halo", link_loss={2: 0.3}, loss_model="rto",
                                                  drop_budget=0.001, no_replan=True))
    assert all(len(p[2]) == 1 for p in plan.placement)
    cluster = LocalCluster(tiny_store, plan, LinkLoss({2: 0.3}, seed=2, model="rto"))
    result = generate(cluster.session(len(ids) + n), ids, n, Sampler(0.0))
    cluster.stop()
    lead = cluster.lead
    assert lead.planner.probes == {2} and lead.satellites.recovered[2] == 0
    for layer, p in enumerate(plan.placement):       # rank 0 computes the probe's group as its own
        assert set(p[2]) <= set(lead.groups.ids(layer))
    assert result.tokens == expected
    assert sum(rec.dropped_share for rec in lead.records) == pytest.approx(0.0, abs=1e-6)


def test_backup_share_out_of_range_is_one_clear_error(capsys):
    from halo_mpi.cli.main import main
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--parallel", "tensor", "--backup-share", "1.5", "--prompt", "x"])
    assert exit_.value.code == 2
    assert "argument --backup-share: must be in [0, 1], got 1.5" in capsys.readouterr().err


class EchoMLP:
    """A satellite 'MLP' whose partial is recognisable: input's marker in its own rank's column."""
    ids = np.arange(1)
    nbytes = 0

    def __init__(self, rank, stall_on_call=None, stall_s=0.0):
        self.rank, self.calls, self.stall_on_call, self.stall_s = rank, 0, stall_on_call, stall_s

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.stall_on_call:
            time.sleep(self.stall_s)
        out = torch.zeros_like(x)
        out[:, self.rank] = x[:, 0]
        return out


class Markers:
    """Rank 0's satellite side (tensor/satellites.py) driven layer by layer against satellites
    (tensor/satellite.py) whose partials carry the step and layer: ranks 1.. each hold group r."""

    def __init__(self, size, loss, policy, stall=None, n_layers=4):
        self.hub, self.n_layers = LocalHub(size, loss), n_layers
        self.imp = np.full(size, 1.0 / size, np.float32)
        self.placed = [np.array([r]) for r in range(size)]
        self.sats = Satellites(self.hub.transports[0], self.hub.transports[0], list(range(1, size)), policy,
                               n_layers, load_copies=None, backups=HeldGroups({}, None))
        mlps = {r: EchoMLP(r) for r in range(1, size)}
        if stall:                                        # (rank, on which call, seconds)
            mlps[stall[0]] = EchoMLP(stall[0], stall[1], stall[2])
        self.workers = [Satellite(self.hub.transports[r],
                                  HeldGroups({l: mlps[r] for l in range(n_layers)}, None))
                        for r in range(1, size)]
        self.threads = [threading.Thread(target=w.run, daemon=True) for w in self.workers]
        for t in self.threads:
            t.start()

    def run(self, steps):
        """Yield (step, layer, marker, output) of every layer of `steps` decode steps."""
        for step in range(1, steps + 1):
            self.sats.begin_step(step, decoding=True)
            for layer in range(self.n_layers):
                marker = step * 100 + layer
                x = torch.full((1, 8), float(marker))
                peers = self.sats.to_ask(layer, self.placed, None)
                self.sats.send(layer, x, peers, self.placed, None, 0)
                yield step, layer, marker, self.sats.fold(layer, x, peers, self.placed, self.imp, None,
                                                          float(self.imp[0]), 0)
        self.step = step

    def stop(self) -> dict[int, dict]:
        t0 = self.hub.transports[0]
        t0.pump(flush=True)          # inputs held by emulated loss go first: seen before STOP
        for r in range(1, self.hub.size):
            t0.send(r, Kind.STOP, 0, -1, np.zeros((0, 1), np.float32))
        done = {}
        while len(done) < self.hub.size - 1:
            for m in t0.poll(5.0):
                if m.kind == Kind.DONE:
                    done[m.source] = m.json()
                else:
                    self.sats.late_discarded[m.source] += 1
        return done


def test_late_partials_are_never_mixed_into_a_later_step():
    policy = SyncPolicy("halo", critical_share=0.3, unstable=frozenset({2, 3}), initial_deadline=0.003)
    m = Markers(4, LinkLoss({2: 0.3, 3: 0.3}, seed=3), policy)
    seen_drop = False
    for step, layer, marker, out in m.run(60):
        col = out[0].numpy()
        assert col[1] == marker                      # stable rank 1: always waited for
        for r in (2, 3):
            assert col[r] in (0.0, marker), (step, layer, r, col[r])   # this step's value or nothing
            seen_drop |= col[r] == 0.0
    done = m.stop()
    assert seen_drop, "30% loss should have dropped some partials"
    records = m.sats.records
    late = sum(m.sats.late_discarded.values())
    dropped = sum(sum(rec.dropped_ranks.values()) for rec in records)
    skipped = sum(d["skipped"] for d in done.values())
    assert late + skipped == dropped    # every dropped partial was discarded late or never computed
    assert set(r for rec in records for r in rec.dropped_ranks) <= {2, 3}


def test_strict_waits_through_loss():
    m = Markers(3, LinkLoss({2: 0.2}, seed=1), SyncPolicy("strict"))
    for _step, _layer, marker, out in m.run(10):
        assert out[0, 1].item() == marker and out[0, 2].item() == marker
    m.stop()
    held = m.hub.transports[0].stats.held + m.workers[1].t.stats.held      # both directions of rank 2's link
    assert held > 0, "20% loss should have held some messages back"
    assert m.hub.transports[0].stats.sent > 0 and sum(m.sats.late_discarded.values()) == 0


def test_a_worker_that_sleeps_once_catches_up():
    """Rank 2 sleeps 0.4 s once (its 9th input: step 3). Without skipping closed steps it would
    answer every stale input in turn and stay late; it must be on time again soon after it wakes.
    (Meanwhile rank 0 goes on without waiting for it: its link counts as stalled.)"""
    policy = SyncPolicy("halo", critical_share=0.3, unstable=frozenset({2}), initial_deadline=0.02,
                        deadline_factor=3.0, deadline_margin=0.01)
    m = Markers(3, None, policy, stall=(2, 9, 0.4))
    ended = None
    for step, _layer, *_ in m.run(400):
        time.sleep(0.001)                                  # rank 0's own work between layers
        if ended is None and m.workers[1].held.mlps[0].calls > 9:  # rank 2 is awake again
            ended = step
    done = m.stop()
    dropped_steps = {rec.step for rec in m.sats.records if rec.dropped_ranks.get(2)}
    assert any(s <= 6 for s in dropped_steps), "the stall should have cost partials around step 3"
    assert done[2]["skipped"] > 0                          # it skipped inputs of closed steps
    assert ended is not None and ended < m.step - 40, "rank 2 should be awake well before the end"
    after = [s for s in range(ended + 10, m.step + 1)]
    late_after = len(dropped_steps & set(after)) / len(after)
    assert late_after < 0.25, f"still late on {late_after:.0%} of the steps after the stall"


# ---------------------------------------------------------------------------------------------
# policy, placement, loss model, link estimate

def test_critical_partials():
    p = SyncPolicy("halo", critical_share=0.5, unstable=frozenset({2, 3}))
    assert p.critical(0.28, {1: 0.26, 2: 0.24, 3: 0.22}) == {1}
    assert SyncPolicy("halo", 0.9, frozenset({2, 3})).critical(0.28, {1: 0.26, 2: 0.24, 3: 0.22}) == {1, 2, 3}
    assert SyncPolicy("halo", 0.7, frozenset({2, 3})).critical(0.28, {1: 0.26, 2: 0.24, 3: 0.22}) == {1, 2}
    assert SyncPolicy("strict").critical(0.1, {1: 0.1, 2: 0.8}) == {1, 2}


def test_placement_puts_the_least_important_groups_on_unstable_ranks():
    rng = np.random.default_rng(0)
    imp = rng.random((3, 24)).astype(np.float32)
    imp /= imp.sum(1, keepdims=True)
    placement = plan(imp, ClusterSpec.uniform(4, unstable={2, 3}))
    for layer, p in enumerate(placement):
        assert sorted(np.concatenate(p).tolist()) == list(range(24))
        assert [len(x) for x in p] == [6, 6, 6, 6]
        low = set(np.argsort(imp[layer])[:12].tolist())
        assert set(p[2].tolist()) | set(p[3].tolist()) == low
        assert abs(imp[layer, p[0]].sum() - imp[layer, p[1]].sum()) < 0.1


def test_scheduler_balances_finish_times_for_a_speed_mix():
    speeds = [1.0, 1.0, 0.5, 0.25]
    counts = group_counts(ClusterSpec([Device(s) for s in speeds]), 48, 30, 0.0)
    finish = [c / s for c, s in zip(counts, speeds)]
    assert sum(counts) == 48
    assert max(finish) - min(finish) <= 1 / min(speeds) + 1e-9     # within one group
    assert counts == sorted(counts, reverse=True)


def test_important_groups_never_land_on_the_least_reliable_rank_with_room_elsewhere():
    imp = np.random.default_rng(1).random((4, 12))
    imp /= imp.sum(1, keepdims=True)
    cluster = ClusterSpec([Device(), Device(reliability=0.99), Device(reliability=0.95),
                           Device(reliability=0.6)])
    for layer, p in enumerate(plan(imp, cluster)):
        ranked = np.argsort(-imp[layer])
        n3 = len(p[3])
        assert n3 == 2                                  # 12 x 0.6 / 3.54 of the work it delivers
        assert set(p[3].tolist()) == set(ranked[-n3:].tolist())    # the least important ones
        assert imp[layer, p[0]].min() >= imp[layer, p[3]].max()


def test_drop_budget_caps_the_importance_an_unstable_rank_holds():
    imp = np.tile(np.arange(1, 13, dtype=np.float32), (3, 1))      # group g has share (g+1)/78
    imp /= imp.sum(1, keepdims=True)
    cluster = ClusterSpec.uniform(3, unstable={2})                 # rank 2: reliability 0.9
    # the k least important hold (1 + ... + k)/78; 0.1 x that <= 0.01 allows k = 3 (6/78)
    assert importance_caps(cluster, imp, 0.01) == [12, 12, 3]
    assert group_counts(cluster, 12, 3, 0.0, imp, 0.01) == [5, 4, 3]
    assert group_counts(cluster, 12, 3, 0.0) == [4, 4, 4]         # strict: no budget
    for p in plan(imp, cluster, drop_budget=0.01):
        assert sorted(p[2].tolist()) == [0, 1, 2]                  # the least important three
    two = ClusterSpec.uniform(4, unstable={2, 3})                   # the budget is shared
    assert importance_caps(two, imp, 0.01)[2:] == [2, 2]
    tight = ClusterSpec([Device(memory_mb=1.0), Device(memory_mb=1.0), Device(reliability=0.5)])
    assert sum(group_counts(tight, 12, 3, 0.1, imp, 0.01)) == 12    # memory wins over the budget


def test_an_unstable_rank_later_than_assumed_is_re_rated_and_keeps_one_group():
    from halo_mpi.net.links import LinkEstimate
    imp = np.tile(np.arange(1, 13, dtype=np.float32), (3, 1))
    imp /= imp.sum(1, keepdims=True)
    cluster = ClusterSpec.uniform(3, unstable={2})                 # prior reliability 0.9
    first = plan(imp, cluster, drop_budget=0.01)
    assert all(len(p[2]) == 3 for p in first)
    links = {r: LinkEstimate() for r in (1, 2)}
    for i in range(40):
        links[1].add_outcome(True)
        links[2].add_outcome(i % 5 == 0)                           # on time 20%: TCP in recovery
    replanner = Replanner(cluster, imp, drop_budget=0.01)
    new, line = replanner.update(links, first, step=3)
    assert new is not None and "rank 2 on-time 0.20 (was 0.90)" in line
    assert cluster.ranks[2].reliability == pytest.approx(0.2)
    assert all(p[2].tolist() == [0] for p in new)                  # the floor: one group
    for _ in range(40):
        links[2].add_outcome(False)
    again, _ = replanner.update(links, new, step=4)
    assert again is None or all(len(p[2]) == 1 for p in again)     # nothing below the floor


def test_shares_follow_speed_times_reliability():
    cluster = ClusterSpec([Device(), Device(), Device(reliability=0.5)])
    assert group_counts(cluster, 25, 30, 0.0) == [10, 10, 5]
    cluster.ranks[0].reliability = 0.5                  # rank 0's own link is never late
    assert group_counts(cluster, 25, 30, 0.0) == [10, 10, 5]
    fast_flaky = ClusterSpec([Device(), Device(speed=2.0, reliability=0.5)])
    assert group_counts(fast_flaky, 24, 30, 0.0) == [12, 12]


def test_replan_after_a_rank_turns_lossy_moves_few_groups():
    from halo_mpi.net.links import LinkEstimate
    imp = np.random.default_rng(2).random((3, 24))
    imp /= imp.sum(1, keepdims=True)
    cluster = ClusterSpec.uniform(4)
    first = plan(imp, cluster)
    links = {r: LinkEstimate() for r in (1, 2, 3)}
    rng = np.random.default_rng(0)
    for _ in range(40):
        links[1].add_outcome(True)
        links[3].add_outcome(True)
        links[2].add_outcome(rng.random() < 0.2)                    # mostly late, not always
    links_rate = links[2].recent_rate
    assert 0 < links_rate < 0.5
    replanner = Replanner(cluster, imp)
    new, line = replanner.update(links, first, step=7)
    assert new is not None and "rank 2" in line and replanner.unstable() == {2}
    rate = replanner.cluster.ranks[2].reliability
    assert rate == links_rate                           # its measured on-time rate
    for layer in range(3):
        held = new[layer][2]
        assert 1 <= len(held) <= 24 * rate / (3 + rate) + 1    # its delivered share, not 6 of 24
        low = set(np.argsort(imp[layer])[:len(held)].tolist())
        assert set(held.tolist()) == low                # its important groups left
    loads = moved(first, new)
    assert sum(loads.values()) <= 3 * (6 + 6)          # only groups that changed tier move
    again, _ = replanner.update(links, new, step=8)
    assert again is None                                # no change, no re-plan


def test_a_re_rating_that_moves_nothing_is_said_once():
    """Two ranks, rank 1 already keeping the fewest groups: it is late more and more, nothing can
    move, and the re-planner says so once (not at every re-rating)."""
    from halo_mpi.net.links import LinkEstimate
    imp = np.random.default_rng(3).random((2, 8))
    imp /= imp.sum(1, keepdims=True)
    cluster = ClusterSpec.uniform(2)
    cluster.ranks[1].reliability = 0.5
    first = plan(imp, cluster, drop_budget=0.0)
    assert all(len(p[1]) == 1 for p in first)         # one group each layer, to measure the link
    replanner = Replanner(cluster, imp, drop_budget=0.0)
    lines = []
    for step, rate in enumerate([0.3, 0.15, 0.05]):
        links = {1: LinkEstimate()}
        for i in range(64):
            links[1].add_outcome(i < 64 * rate)
        new, line = replanner.update(links, first, step=step)
        assert new is None
        lines.append(line)
    assert "nothing to move" in lines[0] and "rank 1 on-time 0.31 (was 0.50)" in lines[0]
    assert lines[1:] == ["", ""]


def test_placement_respects_memory_budgets():
    cluster = ClusterSpec([Device(memory_mb=40), Device(memory_mb=1000), Device(memory_mb=1000)])
    counts = group_counts(cluster, 24, 10, 0.5)          # rank 0 holds at most 8 groups per layer
    assert counts[0] <= 8 and sum(counts) == 24
    with pytest.raises(HaloError, match="cannot hold the model"):
        group_counts(ClusterSpec([Device(memory_mb=10)] * 2), 24, 10, 0.5)


def test_device_profile_toml(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("[default]\nspeed = 1.0\n[rank.2]\nspeed = 0.5\nreliability = 0.8\n")
    c = read_device_profile(str(f), 4, unstable={3})
    assert [r.speed for r in c.ranks] == [1.0, 1.0, 0.5, 1.0]
    assert c.ranks[2].reliability == 0.8 and c.ranks[3].reliability == 0.9
    f.write_text("[rank.1]\nspeeed = 2\n")
    with pytest.raises(HaloError, match="unknown key"):
        read_device_profile(str(f), 4)
    f.write_text("[rank.4]\nspeed = 2\n")
    with pytest.raises(HaloError, match=r"\[rank.4\], but the run has ranks 0..3"):
        read_device_profile(str(f), 4)


def test_sparsity_skips_groups_and_matches_a_subset_model(tiny_store):
    from halo_mpi.model.groups import GroupMLP
    groups = tiny_store.mlp_groups(0)
    mlp = GroupMLP(groups)
    keep = np.array([True, False, True, True, False, False, True, False])
    x = torch.randn(2, tiny_store.args.dim)
    expected = GroupMLP(groups[keep], np.flatnonzero(keep))(x)
    assert torch.allclose(mlp.subset(x, keep), expected, atol=1e-5)
    ids, n = [5, 70, 33], 8
    cluster = LocalCluster(tiny_store, make_plan(tiny_store, 3, ModeOptions.of(sync="strict", sparsity=0.5)))
    result = generate(cluster.session(len(ids) + n), ids, n, Sampler(0.0))
    cluster.stop()
    decode = [r for r in cluster.lead.records if r.decoding]
    assert len(result.tokens) == n and all(0.2 < r.skipped_share < 0.8 for r in decode)


def test_emulated_loss_delay_matches_the_tcp_model():
    loss = LinkLoss({1: 0.05}, seed=0, model="rto")
    assert loss.delay(0, 2, 5000) == 0.0                     # no loss configured on rank 2's link
    n, nbytes = 20000, 3000                                  # 2 packets per message
    delays = np.array([loss.delay(0, 1, nbytes) for _ in range(n)])
    expected = 2 * 0.2 * 0.05 / (1 - 2 * 0.05)               # k * RTO * E[2^L - 1], L ~ geometric
    assert abs(delays.mean() - expected) < 0.15 * expected
    assert abs((delays > 0).mean() - (1 - 0.95 ** 2)) < 0.01
    assert set(np.round(delays[delays > 0], 3)) >= {0.2, 0.4, 0.6}   # 1 loss, 2 losses, 1+doubling
    again = LinkLoss({1: 0.05}, seed=0, model="rto")
    assert [again.delay(0, 1, nbytes) for _ in range(50)] == delays[:50].tolist()


def test_tcp_loss_model_stalls_like_the_testbed():
    """The fitted model: ~1.2p of multi-segment messages stall ~200 ms (doubling sometimes), a
    one-segment message rarely, and a few percent are late by milliseconds."""
    loss = LinkLoss({1: 0.05}, seed=1)
    d = {size: np.array([loss.delay(0, 1, size) for _ in range(20000)]) for size in (1000, 2400, 8000)}
    for size in (2400, 8000):
        assert abs((d[size] >= 0.2).mean() - 1.2 * 0.05) < 0.01       # not growing with size
    assert (d[1000] >= 0.2).mean() < 0.02
    assert 0 < (d[2400] >= 0.4).mean() < 0.02                          # doubled stalls are rare
    fast = ((d[2400] > 0) & (d[2400] < 0.011)).mean()
    assert 0.08 < fast < 0.17


def test_a_one_segment_message_stalls_as_the_square_of_the_loss():
    """HALO's one-segment message on the testbed (jobs/segment_loss.py) stalled 100 ms or more for
    0.008, 0.028, 0.097, 0.260 of messages at 5, 10, 20, 30% loss: ~2.8 p^2, not linear in p; the
    fit finds the law's factor again from samples of the model."""
    from halo_mpi.bench.emulation import fit_loss_model
    samples = {}
    for p in (0.05, 0.1, 0.2, 0.3):
        model = LinkLoss({1: p}, seed=2)
        d = np.array([model.delay(0, 1, 1188) for _ in range(20000)])
        assert abs((d >= 0.1).mean() - 2.8 * p * p) < 0.015
        samples[p] = {1188: (1e3 * d).tolist()}
    fitted = fit_loss_model({0.0: {1188: [0.1]}, **samples})
    assert abs(fitted["single_per_p2"] - 2.8) < 0.15 and abs(fitted["single_fast_per_p"] - 0.7) < 0.1


def test_parse_rank_values_errors():
    def parse(spec):
        return parse_rank_values(spec, "--link-loss", range(1, 4), values=(0.0, 1.0))
    assert parse("2:0.05,3:0.1") == {2: 0.05, 3: 0.1}
    for bad, msg in [("2-0.05", "RANK:VALUE"), ("0:0.1", "rank 0, but the workers are ranks 1..3"),
                     ("5:0.1", "rank 5"), ("1:1.5", r"not in \[0, 1\)"), ("1:0.1,1:0.2", "twice")]:
        with pytest.raises(HaloError, match=msg):
            parse(bad)


def test_link_estimate_ignores_retransmission_stalls():
    est = LinkEstimate(factor=1.5, margin=0.002, initial=0.1)
    assert est.deadline() == 0.1
    for i in range(60):
        est.add_latency(0.004 + 0.0001 * (i % 5))
    for _ in range(6):
        est.add_latency(0.25)                                # stalls
    assert 0.007 < est.deadline() < 0.01


def test_a_late_partial_restarts_a_satellites_record_for_promotion():
    """Promotion needs PROMOTE_AFTER partials on time in a row (roles.py): one late one among
    them starts the count again, however long the window of outcomes."""
    est = LinkEstimate()
    for ok in [True] * 700 + [False] + [True] * 300:
        est.add_outcome(ok)
    assert est.streak == 300 and est.recent_rate > 0.99


def test_grace_counts_from_the_critical_partials_not_from_the_send():
    # round trips of 5-9 ms (every rank slow alike) but partials that trail the critical ones by
    # at most 1 ms: rank 0 waits ~1.5 x 1 ms + margin after the critical ones, not ~1.5 x 9 ms
    link = LinkEstimate(margin=0.001)
    for i in range(40):
        link.add_latency(0.005 + 0.0001 * i, lag=0.001 * (i % 2))
    link.add_latency(0.2, lag=0.2)                      # a stall leaves the bound alone
    assert link.grace() == pytest.approx(1.5 * 0.001 + 0.001)
    assert link.deadline() > 0.01


def test_in_order_links_hold_later_messages_behind_a_delayed_one():
    loss = LinkLoss({1: 0.2}, seed=16, in_order=True, model="rto")   # seed 16: the first loses a packet
    hub = LocalHub(2, loss)
    t0, t1 = hub.transports
    for i in range(6):
        t0.send(1, Kind.INPUT, i, 0, np.zeros((1, 4), np.float32))
    assert t0.stats.held == 1 and len(t0._held[1]) == 6     # one delayed, five behind it
    got, end = [], time.time() + 10
    while len(got) < 6 and time.time() < end:
        got += [m.step for m in t1.poll(0.05)]
        t0.pump()
    assert got == list(range(6))


def test_shards_hold_only_their_groups_and_run_like_the_store(tiny_store, tmp_path):
    from halo_mpi.store.hdf5 import Store
    from halo_mpi.store.writer import write_shard
    plan = make_plan(tiny_store, 3, ModeOptions.of(sync="strict", link_loss={2: 0.1}))
    for r in range(3):
        write_shard(tiny_store, str(tmp_path / f"s.rank{r}.h5"), r, 3, [p[r] for p in plan.placement])
    with Store(str(tmp_path / "s.rank2.h5")) as s2:
        assert s2.mlp_group_ids(1).tolist() == plan.placement[1][2].tolist()
        # every attention group and the head (any rank may hold some), no norms or tokenizer
        assert "layers/001/attn_groups" in s2.f and "embedding" in s2.f
        assert "layers/001/attn_norm" not in s2.f and "tokenizer" not in s2.f
        with pytest.raises(HaloError, match="does not hold"):
            s2.mlp_groups(1, plan.placement[1][1])
    with Store(str(tmp_path / "s.rank0.h5")) as s0:
        plan0 = make_plan(s0, 3, ModeOptions.of(sync="strict", link_loss={2: 0.1}))
        assert all((a[r] == b[r]).all() for a, b in zip(plan0.placement, plan.placement) for r in range(3))


def test_a_satellite_reads_a_new_plan_while_idle_and_switches_at_its_first_input():
    """PLAN: the satellite reads the groups it gains while idle and says READY; an input of the
    new plan is answered with them, one of the old plan no longer (its step is closed)."""
    hub = LocalHub(2)
    loads = []
    load = lambda layer, ids: loads.append((layer, ids.tolist())) or EchoMLP(1)   # noqa: E731
    worker = Satellite(hub.transports[1], HeldGroups({0: EchoMLP(1)}, load))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    rank0 = hub.transports[0]
    rank0.send(1, Kind.PLAN, 5, -1, json_payload({"mlp": [[3, 4]]}), plan=1)
    ready = rank0.poll(5.0)
    assert [(m.kind, m.plan) for m in ready] == [(Kind.READY, 1)] and loads == [(0, [3, 4])]
    rank0.send(1, Kind.INPUT, 6, 0, np.full((1, 4), 7.0, np.float32), plan=1)
    reply = rank0.poll(5.0)
    assert [(m.kind, m.step, m.plan) for m in reply] == [(Kind.PARTIAL, 6, 1)]
    assert reply[0].payload[0, 1] == 7.0 and worker.held.version == 1
    rank0.send(1, Kind.INPUT, 7, 0, np.full((1, 4), 8.0, np.float32), plan=0)   # an old plan's
    rank0.send(1, Kind.STOP, 8, -1, np.zeros((0, 1), np.float32))
    thread.join(5)
    assert not thread.is_alive() and worker.skipped == 1


def test_the_loss_models_stay_finite_at_any_loss_rate():
    """A retransmission is lost with probability ~p and the backed-off timeout is capped at
    Linux's 120 s: no p makes the expected hold unbounded (at 3.5 x p it was, above p ~ 0.14)."""
    for model in ("tcp", "rto"):
        for p in (0.1, 0.3, 0.6, 1.0):
            loss = LinkLoss({1: p}, seed=0, model=model)
            delays = [loss.delay(0, 1, 2000) for _ in range(4000)]
            assert max(delays) <= 2 * 120.0 and np.isfinite(np.mean(delays))
    at30 = LinkLoss({1: 0.3}, seed=0)
    assert 0.05 < np.mean([at30.delay(0, 1, 2000) for _ in range(20000)]) < 1.0


@pytest.mark.parametrize("room", [True, False])
def test_a_late_rank_with_nowhere_to_go_is_backed_up_by_rank_0(tiny_store, room):
    """Two ranks: rank 1 late more and more until it keeps the fewest groups it can (one a layer)
    and nothing can move; rank 0 backs its groups up (as far as its memory budget has room), says
    so once, and computes them when rank 1's partials are late."""
    o = ModeOptions.of(sync="halo", unstable_ranks=frozenset({1}), drop_budget=0.1, backup_share=0.0)
    cluster = LocalCluster(tiny_store, make_plan(tiny_store, 2, o))
    lead = cluster.lead
    planner = lead.planner
    if not room:                                   # rank 0's budget: what it holds now
        planner.replanner.cluster.ranks[0].memory_mb = (lead.weight_bytes + lead.model_bytes) / 1e6
    session = cluster.session(64)
    for rate in (0.6, 0.3, 0.25):
        for i in range(200):
            lead.links[1].add_outcome(i < 200 * rate)
        planner.maybe_replan(lead.links)
        for _ in range(8):                           # a plan's groups are read between steps
            if planner.pending is None:
                break
            got = session.step(torch.tensor([5]), decoding=False)
        assert planner.pending is None
    said = [line for line in planner.replans if "nothing to move" in line]
    held = sum(len(p[1]) for p in planner.placement)
    assert len(said) == 1 and held > 0 and 1 not in planner.probes, planner.replans
    assert any("in place from step" in line for line in planner.replans)
    got = session.step(torch.tensor([5]), decoding=False)
    backed = sum(len(m.ids) for (_, r), m in planner.backups.mlps.items() if r == 1)
    if room:
        assert f"rank 0 now backs up 100% of rank 1's {held} groups" in said[0]
        assert backed == held and planner.pending is None
    else:
        assert "rank 0 has no room to back up rank 1's groups" in said[0] and backed == 0
    assert torch.isfinite(got).all()
    cluster.stop()


@pytest.mark.parametrize("drop_budget, backup_share", [(1.0, None), (0.05, None), (0.05, 0.0)])
def test_a_replan_read_in_the_background_keeps_the_reference_logits(tiny_store, drop_budget, backup_share):
    """Rank 2 (a satellite) is re-rated mid-sequence: the groups it loses are read by the others
    a slice at a time between steps, switched in at one step for every rank, and the logits stay
    the reference's (float32 wire, every partial waited for: nothing dropped). With a small drop
    budget it becomes a probe, whose group rank 0 then computes as its own."""
    from halo_mpi.net.links import LinkEstimate
    ids = [5, 70, 33, 9, 120, 17, 3, 44]
    ref_model = Transformer.from_store(tiny_store)
    ref_cache = ref_model.new_cache(32)
    o = ModeOptions.of(sync="halo", unstable_ranks=frozenset({2}), critical_share=1.0, wire_dtype="float32",
                       drop_budget=drop_budget, backup_share=backup_share)
    cluster = LocalCluster(tiny_store, make_plan(tiny_store, 3, o))
    planner = cluster.lead.planner
    before = [p[2].copy() for p in planner.placement]
    session = cluster.session(32)
    with torch.inference_mode():
        for i, token in enumerate(ids):
            if i == 3:                                   # rank 2 turns late: re-rated, groups move
                late = LinkEstimate()
                for k in range(40):
                    late.add_outcome(k % 4 == 0)
                planner.maybe_replan({2: late})
                assert planner.pending is not None and planner.version == 0
            got = session.step(torch.tensor([token]), decoding=True)
            want = ref_model(torch.tensor([token]), ref_cache, last_only=True)
            assert (got - want).abs().max().item() < 1e-4, i
    workers = cluster.stop()
    assert planner.version == 1 and planner.pending is None
    assert sum(len(p[2]) for p in planner.placement) < sum(len(b) for b in before)
    assert any("in place from step" in line for line in planner.replans)
    assert workers[2]["groups"] == sum(len(p[2]) for p in planner.placement)
    assert planner.probes == ({2} if drop_budget < 1 else set())


def test_members_measured_apart_are_rerated_and_a_balanced_cluster_is_left_alone():
    """SpeedMeter and the re-planner, with compute times given (no clock): rank 1 taking 3x
    rank 0's time is imbalanced past the band, re-rated to a third of its speed and sheds MLP
    groups to the others; times within the band are no reason to re-plan, a disturbed step
    (noise only adds time) does not count, and a rank measured over fewer than a window of steps
    is not judged."""
    from halo_mpi.tensor.placement import SPEED_BAND
    from halo_mpi.tensor.speeds import WINDOW, SpeedMeter
    imp = np.full((4, 12), 1 / 12)
    cluster = ClusterSpec.uniform(3)
    first = plan(imp, cluster)
    meter = SpeedMeter()
    for i in range(WINDOW):
        meter.add(0, 1e-3 if i else 9e-3)             # one step disturbed: not the first quartile
        meter.add(1, 1.3e-3)                          # within the band: no imbalance to act on
    meter.add(2, 9e-3)                                # one sample only: not judged
    assert meter.imbalance() == pytest.approx(1.3) and meter.imbalance() <= SPEED_BAND
    for _ in range(WINDOW):
        meter.add(1, 3e-3)
    assert meter.imbalance() == pytest.approx(3.0) and meter.ratios() == pytest.approx({1: 1 / 3})
    replanner = Replanner(cluster, imp)
    new, line = replanner.rerate_speeds(meter.ratios(), first, step=5)
    assert new is not None and "rank 1 measured speed 0.33 (was 1.00)" in line
    assert sum(len(p[1]) for p in new) < sum(len(p[1]) for p in first)
    assert set(moved(first, new)) <= {0, 2}           # its groups go to the others
    again, said = replanner.rerate_speeds({1: 1.2}, new, step=9)      # within 25% of its rating
    assert again is None and said == ""
    meter.forget()
    assert meter.imbalance() == 1.0 and meter.ratios() == {}


def test_a_slowed_member_gets_fewer_groups_within_twelve_steps(tiny_store):
    """--slow 1:3@0 at -n 2 (HALO, no unstable rank): rank 1's compute is stretched 3x; rank 0
    measures it from the compute times rank 1 sends with its logits, re-rates it, and its MLP
    groups and head rows fall within 12 steps, read in the background and switched at one step; the logits
    stay the reference's (nothing dropped: rank 1 is a member). (The twin's threads share an
    interpreter: their own compute times are noise, the 3x stretch is not.)"""
    o = ModeOptions.of(sync="halo", wire_dtype="float32", slow={1: (3.0, 0)})
    cluster = LocalCluster(tiny_store, make_plan(tiny_store, 2, o), speeds=True)
    planner = cluster.lead.planner
    before = sum(len(p[1]) for p in planner.placement)
    rows = planner.head.vocab[1][1] - planner.head.vocab[1][0]
    ref_model = Transformer.from_store(tiny_store)
    ref_cache = ref_model.new_cache(32)
    session = cluster.session(32)
    with torch.inference_mode():
        for i in range(14):
            token = torch.tensor([(7 * i + 3) % 100])
            got = session.step(token, decoding=True)
            want = ref_model(token, ref_cache, last_only=True)
            assert (got - want).abs().max().item() < 1e-4, i
    workers = cluster.stop()
    rerated = [line for line in planner.replans if "rank 1 measured speed" in line]
    assert rerated and "in place from step" in rerated[0], planner.replans
    at = int(rerated[0].split("in place from step ")[1].split()[0].rstrip(";"))
    assert at <= 12
    assert workers[1]["groups"] == sum(len(p[1]) for p in planner.placement) < before
    # the head rows follow: fewer on rank 1, the split still the whole vocabulary, in order
    assert "head rows" in rerated[0] and workers[1]["head_rows"] < rows
    (a0, b0), (a1, b1) = planner.head.vocab
    assert a0 == 0 and b0 == a1 and b1 == tiny_store.args.vocab_size and workers[1]["head_rows"] == b1 - a1


@pytest.mark.parametrize("store_name", ["tiny_store", "kv3_store"])
def test_a_member_late_on_its_rounds_is_demoted_and_the_logits_stay_the_reference(request, store_name):
    """Rank 2 holds attention groups and head rows when its all-reduce rounds turn late: it is
    demoted mid-sequence to a satellite, its attention groups and head rows move to ranks 0
    and 1, rank 0 replays the sequence so far to refill the moved groups' K/V caches, and every
    step's logits stay the reference's (float32 wire, every satellite partial waited for)."""
    store = request.getfixturevalue(store_name)
    ids = [5, 70, 33, 9, 120, 17, 3, 44, 8, 61]
    ref_model = Transformer.from_store(store)
    ref_cache = ref_model.new_cache(32)
    o = ModeOptions.of(sync="halo", critical_share=1.0, wire_dtype="float32", prefill_chunk=3)
    plan = make_plan(store, 3, o)
    assert plan.members == [0, 1, 2] and any(len(p[2]) for p in plan.attention)
    cluster = LocalCluster(store, plan)
    planner, lead = cluster.lead.planner, cluster.lead
    session = cluster.session(32)
    with torch.inference_mode():
        want = ref_model(torch.tensor(ids[:4]), ref_cache, last_only=True)
        got = session.step(torch.tensor(ids[:4]), decoding=False)
        assert (got - want).abs().max().item() < 1e-4
        for i, token in enumerate(ids[4:]):
            if i == 2:                               # rank 2's rounds turn late (as exchange.py counts)
                for k in range(40):
                    planner.roles.links[2].add_outcome(k % 3 == 0)
            got = session.step(torch.tensor([token]), decoding=True)
            want = ref_model(torch.tensor([token]), ref_cache, last_only=True)
            assert (got - want).abs().max().item() < 1e-4, i
    workers = cluster.stop()
    assert planner.roles.members == [0, 1] and lead.members == [0, 1] and planner.version == 1
    assert all(not len(layer[2]) for layer in planner.roles.attention)
    assert sorted(np.concatenate([np.concatenate(layer) for layer in planner.roles.attention]).tolist()) == \
        sorted(np.concatenate([np.concatenate(layer) for layer in plan.attention]).tolist())
    assert planner.head.vocab[2][1] == planner.head.vocab[2][0]
    assert 2 in lead.satellites.ranks and 2 in planner.policy.unstable
    assert lead.replays and lead.replays[0][1] >= 6
    assert any("rank 2 demoted" in line for line in planner.replans)
    assert workers[2].get("demoted") and workers[2]["attention_groups"] == 0, workers[2]


def test_a_demoted_member_whose_link_recovers_is_promoted_back(kv3_store):
    """Rank 2 is demoted (late rounds), then its partials as a satellite come on time for long
    enough (twice PROMOTE_AFTER: it was demoted once): it joins the members again, gets attention
    groups back (their caches refilled by a replay) and head rows, and the logits stay the
    reference's all along."""
    from halo_mpi.tensor.roles import PROMOTE_AFTER
    store = kv3_store
    ids = [5, 70, 33, 9, 120, 17, 3, 44, 8, 61, 7, 19, 23, 2]
    ref_model = Transformer.from_store(store)
    ref_cache = ref_model.new_cache(32)
    o = ModeOptions.of(sync="halo", critical_share=1.0, wire_dtype="float32", prefill_chunk=4)
    cluster = LocalCluster(store, make_plan(store, 3, o))
    planner, lead = cluster.lead.planner, cluster.lead
    session = cluster.session(32)
    with torch.inference_mode():
        for i, token in enumerate(ids):
            if i == 3:
                for k in range(40):
                    planner.roles.links[2].add_outcome(k % 3 == 0)
            if i == 7:
                assert planner.roles.members == [0, 1]
                for _ in range(2 * PROMOTE_AFTER):
                    lead.links[2].add_outcome(True)
            got = session.step(torch.tensor([token]), decoding=True)
            want = ref_model(torch.tensor([token]), ref_cache, last_only=True)
            assert (got - want).abs().max().item() < 1e-4, i
    workers = cluster.stop()
    assert planner.roles.members == [0, 1, 2] and lead.members == [0, 1, 2] and planner.version == 2
    assert sum(len(layer[2]) for layer in planner.roles.attention) > 0
    assert planner.head.vocab[2][1] > planner.head.vocab[2][0]
    assert 2 not in lead.satellites.ranks and len(lead.replays) == 2
    assert any("rank 2 promoted" in line for line in planner.replans)
    assert workers[2].get("promoted") and workers[2]["attention_groups"] > 0, workers[2]
