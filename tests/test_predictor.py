"""Importance predictor and neuron regrouping."""
import shutil

import numpy as np
import pytest
import torch

from halo_mpi.model.llama import Transformer
from halo_mpi.model.texts import CALIBRATION_TOPICS, EVALUATION_TOPICS, calibration_text, evaluation_text
from halo_mpi.model.tokenizer import Tokenizer
from halo_mpi.store.hdf5 import Store
from halo_mpi.tensor.calibrate import balanced_bisection, regroup
from halo_mpi.tensor.importance import static_importance
from halo_mpi.tensor.predictor import collect, coverage, quality, top_half, train


def test_calibration_and_evaluation_texts_are_disjoint():
    assert not set(CALIBRATION_TOPICS) & set(EVALUATION_TOPICS)
    assert len(calibration_text()) > 50_000 and len(evaluation_text()) > 20_000


@pytest.mark.slow
def test_predictor_covers_far_more_than_random_on_held_out_text(real_store):
    """Six layers of the real model: fit on calibration text, judge on disjoint topics."""
    tok = Tokenizer.from_store(real_store)
    model = Transformer.from_store(real_store, layers=range(6))
    xs, ys = collect(model, tok.encode(calibration_text())[:1024], progress=False)
    xe, ye = collect(model, tok.encode(evaluation_text())[:512], progress=False)
    static = static_importance({l: y.numpy() for l, y in ys.items()})
    q = quality(train(xs, ys, rank=16, progress=False), static, xe, ye)
    gen = torch.Generator().manual_seed(0)
    random_cov = np.mean([coverage(ye[l], top_half(torch.rand(ye[l].shape, generator=gen))) for l in ye])
    assert q["covered_share_predictor"] > random_cov + 0.04, (q, random_cov)
    assert q["covered_share_predictor"] > q["covered_share_static"]
    assert q["recall_predictor"] > q["recall_static"] + 0.03
    assert q["covered_share_predictor"] <= q["covered_share_oracle"] + 1e-6


def test_balanced_bisection_gives_equal_groups_of_similar_rows():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 16))
    rows = np.repeat(centers, 8, axis=0) + 0.01 * rng.standard_normal((32, 16))
    perm = rng.permutation(32)
    order = balanced_bisection(torch.from_numpy(rows[perm]).float(), 4).numpy()
    assert sorted(order.tolist()) == list(range(32))
    clusters = (perm[order] // 8).reshape(4, 8)              # the true cluster of each row, per group
    assert all(len(set(g.tolist())) == 1 for g in clusters)


def test_regrouping_leaves_the_model_output_unchanged(tiny_store_path, tmp_path):
    path = tmp_path / "regrouped.h5"
    shutil.copy(tiny_store_path, path)
    ids = torch.tensor([5, 70, 33, 9])
    with Store(str(path)) as s:
        model = Transformer.from_store(s)
        before = model(ids, model.new_cache(8))
        old_groups = s.mlp_groups(0)
    xs, _ = collect(model, list(range(3, 200)), progress=False)
    order = regroup(str(path), model, xs, progress=False)
    with Store(str(path), verify=True) as s:           # the regrouped groups' checksums rewritten
        model = Transformer.from_store(s)
        after = model(ids, model.new_cache(8))
        assert not np.array_equal(s.mlp_groups(0), old_groups)
        assert np.array_equal(s.calibration("neuron_order"), order)
    assert sorted(order[0].tolist()) == list(range(256))
    assert (before - after).abs().max().item() < 1e-4
