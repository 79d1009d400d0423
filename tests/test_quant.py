"""Quantized stores: the quantizers against a block-by-block reference, the kernel against the
dequantized weights, and every mode on a quantized store against the single process on it."""
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import halo

from halo_mpi.errors import HaloError
from halo_mpi.model.jobs import Job
from halo_mpi.model.llama import Transformer
from halo_mpi.model.qlinear import QuantLinear
from halo_mpi.model.quant import (
    QUANT_DTYPES,
    bf16_round,
    from_records,
    quantize,
    record_fields,
    to_records,
)
from halo_mpi.options.tree import ModeOptions
from halo_mpi.pipeline.run import run_local
from halo_mpi.store.convert import convert_store, write_synthetic
from halo_mpi.store.hdf5 import Store, float_to_records, records_to_float
from halo_mpi.tensor.local import LocalCluster
from halo_mpi.tensor.plan import make_plan


@pytest.fixture
def exact_kernel():
    """The int4 kernel on float32 activations: exactly x @ dequantize(W).T (slow; tests only)."""
    QuantLinear.exact = True
    yield
    QuantLinear.exact = False


def reference_block(block: np.ndarray, dtype: str):
    """One block of 32, quantized the obvious way, in float64 where it does not matter."""
    def bf16_up(v):                       # the smallest bfloat16 >= v (v >= 0)
        r = float(torch.tensor(v, dtype=torch.float32).bfloat16().float())
        if r < np.float32(v):
            inf = torch.tensor(float("inf"), dtype=torch.bfloat16)
            r = float(torch.nextafter(torch.tensor(r, dtype=torch.bfloat16), inf).float())
        return r
    if dtype == "q8_0":
        scale = bf16_up(np.float32(np.abs(block).max()) / np.float32(127))
        codes = [128 if scale == 0 else
                 int(np.clip(np.rint(np.float32(w) / np.float32(scale)), -127, 127)) + 128 for w in block]
        return np.array(codes), scale, 0.0
    lo, hi = block.min(), block.max()
    scale = bf16_up(np.float32(hi - lo) / np.float32(15))
    zero = float(torch.tensor(np.float32(lo) + np.float32(8) * np.float32(scale)).bfloat16().float())
    safe = scale if scale > 0 else 1.0
    codes = [int(np.clip(np.rint((np.float32(w) - np.float32(zero)) / np.float32(safe)) + 8, 0, 15))
             for w in block]
    return np.array(codes), scale, zero


def awkward_matrix(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random rows plus the cases that break quantizers: zeros, a constant, huge and tiny scales."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    w[0] = 0
    w[1, :32] = 0.3                            # constant block
    w[2, :32] *= np.float32(1e30)
    w[3, :32] *= np.float32(1e-30)             # subnormal-ish scales
    w[4, 5] = 1e4                              # one outlier in a block
    return w


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
def test_quantizer_equals_the_block_by_block_reference(dtype):
    w = awkward_matrix(8, 64)
    m = quantize(w, dtype)
    for r in range(w.shape[0]):
        for b in range(2):
            codes, scale, zero = reference_block(w[r, 32 * b:32 * b + 32], dtype)
            assert np.array_equal(m.codes[r, 32 * b:32 * b + 32], codes), (r, b)
            assert m.scale[r, b] == np.float32(scale) and m.zero[r, b] == np.float32(zero), (r, b)
    err = np.abs(m.dequantize() - w).reshape(8, 2, 32).max(-1)
    # within half a step, plus (q4) the offset's bfloat16 rounding
    slack = 0.5 * m.scale * 1.0001 + (np.abs(m.zero) * 2.0 ** -8 if dtype == "q4" else 0)
    assert np.all(err <= slack + 1e-38)
    assert np.all(m.dequantize()[0] == 0) and np.all(np.isfinite(m.dequantize()))


def test_bf16_rounding_matches_torch():
    x = np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 1e3
    assert np.array_equal(bf16_round(x), torch.from_numpy(x).bfloat16().float().numpy())
    up = bf16_round(np.abs(x), up=True)
    assert np.all(up >= np.abs(x)) and np.array_equal(bf16_round(up), up)


def test_q4_finds_the_codes_of_a_q4_1_grid_again():
    """Values on a Q4_1 grid (fp16 d, m as in the GGUF) come back with the same codes, for blocks
    centred near 0 as weights are (an offset far from 0 is rounded to bfloat16 at 2^-9 of itself,
    which can shift a block's codes by one)."""
    rng = np.random.default_rng(2)
    d = rng.uniform(0.001, 0.05, (64, 4)).astype(np.float16).astype(np.float32)
    m = (-d * rng.uniform(6.5, 8.5, (64, 4))).astype(np.float16).astype(np.float32)
    codes = rng.integers(0, 16, (64, 4, 32))
    codes[..., 0], codes[..., 1] = 0, 15                        # llama.cpp's min/max rule uses both ends
    w = (codes * d[..., None] + m[..., None]).reshape(64, 128).astype(np.float32)
    q = quantize(w, "q4")
    assert np.array_equal(q.codes.reshape(64, 4, 32), codes)
    assert np.abs(q.dequantize() - w).max() < 0.01 * np.abs(w).max()


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
@pytest.mark.parametrize("rows", [64, 515, 3 * 64 + 16])
def test_kernel_is_exact_to_its_dequantized_weights(dtype, rows, exact_kernel):
    w = awkward_matrix(rows, 96, seed=rows)
    w[2:4] = 0.02 * w[5:7]                     # keep the outputs in float32 range for this check
    m = quantize(w, dtype)
    x = torch.randn(5, 96)
    want = x @ torch.from_numpy(m.dequantize()).T
    lin = QuantLinear(m)
    got = lin(x)
    assert got.shape == (5, rows) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    QuantLinear.exact = False                   # the fast path: bfloat16 activations and results
    assert (lin(x) - want).abs().max() <= 1e-2 * want.abs().max()
    assert torch.allclose(lin.weight(), torch.from_numpy(m.dequantize()), atol=1e-6 * float(np.abs(w).max()))


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
def test_records_round_trip(dtype, tiny_store):
    a = tiny_store.args
    for kind, w in (("mlp", tiny_store.mlp_groups(0)), ("attn", tiny_store.attn_groups(1)),
                    ("row", tiny_store.embedding()[:50])):
        recs = float_to_records(a, kind, w, dtype)
        back = records_to_float(a, kind, recs)
        assert back.shape == w.shape
        assert np.abs(back - w).max() < (0.02 if dtype == "q8_0" else 0.2) * np.abs(w).max()
        again = records_to_float(a, kind, float_to_records(a, kind, back, dtype))
        if dtype == "q4":              # min/max rule on its own grid: the same grid
            assert np.array_equal(again, back)
        else:                          # a block whose largest code was 126 gets a finer scale
            assert np.abs(again - back).max() < 0.01 * np.abs(w).max()
    recs = np.zeros(3, dtype=np.dtype(record_fields("w", (2, 64), dtype)))
    to_records(recs, "w", awkward_matrix(6, 64).reshape(3, 2, 64))
    assert from_records(recs, "w").shape == (6, 64) and from_records(recs, "w", axis=1).shape == (2, 192)


# ---------------------------------------------------------------------------------------------
# stores

@pytest.fixture(scope="module", params=QUANT_DTYPES)
def quant_stores(request, tmp_path_factory, kv3_store):
    """(the quantized kv3 store, the float32 store of exactly its dequantized weights)."""
    d = tmp_path_factory.mktemp(request.param)
    q, f = d / "q.h5", d / "deq.h5"
    convert_store(kv3_store.path, str(q), request.param, progress=False)
    convert_store(str(q), str(f), "float32", progress=False)
    with Store(str(q)) as qs, Store(str(f)) as fs:
        yield qs, fs


def test_a_quantized_store_computes_its_dequantized_model(quant_stores, exact_kernel):
    q, f = quant_stores
    ids = torch.tensor([5, 70, 33, 9, 120, 7, 8, 200])
    mq, mf = Transformer.from_store(q), Transformer.from_store(f)
    lq, lf = mq(ids, mq.new_cache(16)), mf(ids, mf.new_cache(16))
    assert (lq - lf).abs().max() < 1e-3
    assert mq.weight_bytes() < 0.45 * mf.weight_bytes()
    QuantLinear.exact = False
    mq = Transformer.from_store(q)
    fast = mq(ids, mq.new_cache(16))
    # bfloat16 activations: measured 4e-3 on this model (logits ~1.5)
    assert (fast - lf).abs().max() < 2e-2 and (fast - lf).abs().max() > 0


def test_strict_tensor_mode_on_a_quantized_store_equals_the_single_process(quant_stores, exact_kernel):
    q, _ = quant_stores
    ids = [5, 70, 33, 9, 120]
    ref_model = Transformer.from_store(q)
    ref = ref_model(torch.tensor(ids), ref_model.new_cache(8))
    for ranks in (2, 3):
        cluster = LocalCluster(q, make_plan(q, ranks, ModeOptions.of(parallel="tensor", sync="strict")))
        got = cluster.session(8).step(torch.tensor(ids), decoding=False, last_only=False)
        cluster.stop()
        assert (got - ref).abs().max().item() < 1e-3, ranks


def test_halo_sparsity_on_a_quantized_store_drops_only_the_skipped_groups(quant_stores, exact_kernel):
    q, f = quant_stores
    from halo_mpi.model.groups import GroupMLP
    keep = np.array([True, False, True, True, False, False, True, True])
    x = torch.randn(3, q.args.dim)
    got = GroupMLP(q.mlp_groups(1)).subset(x, keep)
    want = GroupMLP(f.mlp_groups(1)).subset(x, keep)
    assert (got - want).abs().max() < 1e-4


def test_pipeline_on_a_quantized_store_equals_the_single_process(quant_stores, exact_kernel):
    q, _ = quant_stores
    requests = [Job([5, 70, 33, 9, 120], 6, index=0), Job([7, 8, 1], 5, index=1)]
    run = run_local(q, requests, ModeOptions.of(parallel="pipeline", num_sequences=2), 3, keep_logits=True)
    model = Transformer.from_store(q)
    for seq, req in zip(run.sequences, requests):
        cache = model.new_cache(len(req.ids) + req.max_new)
        with torch.inference_mode():
            logits = model(torch.tensor(req.ids), cache, last_only=True)[0]
            for step, tok in enumerate(seq.result.tokens):
                assert (seq.logits[step] - logits).abs().max() < 1e-3, step
                assert tok == int(logits.argmax())
                logits = model(torch.tensor([tok]), cache, last_only=True)[0]


# ---------------------------------------------------------------------------------------------
# clear errors

def test_quantizing_twice_and_regrouping_a_quantized_store_are_refused(quant_stores, tmp_path):
    q, _ = quant_stores
    with pytest.raises(HaloError, match="quantizing twice"):
        convert_store(q.path, str(tmp_path / "again.h5"), "q4", progress=False)
    from halo_mpi.tensor.calibrate import calibrate
    with pytest.raises(HaloError, match="regroup"):
        calibrate(q.path, None, 32, 4, do_regroup=True, progress=False)


def test_groups_that_do_not_fill_blocks_of_32_are_one_clear_error(tmp_path):
    with pytest.raises(HaloError, match="multiple of 32"):
        write_synthetic("tiny", str(tmp_path / "t.h5"), mlp_groups=16, progress=False, store_dtype="q4")
    assert not (tmp_path / "t.h5").exists()


def test_an_older_store_says_how_to_reconvert(tiny_store_path, tmp_path):
    old = tmp_path / "old.h5"
    old.write_bytes(tiny_store_path.read_bytes())
    with h5py.File(old, "r+") as f:
        f.attrs["layout_version"] = 1
        del f.attrs["store_dtype"]
    with pytest.raises(HaloError, match="layout version 1.*halo-mpi convert"):
        Store(str(old))


def test_convert_cli_writes_each_store_dtype_and_info_shows_it(tiny_store_path, tmp_path):
    for dtype in QUANT_DTYPES:
        out = tmp_path / f"{dtype}.h5"
        done = halo("convert", tiny_store_path, "-o", out, "--store-dtype", dtype, "--quiet", timeout=120)
        assert done.returncode == 0, done.stderr
        info = halo("info", "--weights", out, timeout=60)
        assert f"store_dtype      {dtype}" in info.stdout and "bytes/MLP group" in info.stdout
        assert out.stat().st_size < (0.35 if dtype == "q8_0" else 0.25) * tiny_store_path.stat().st_size


def test_a_bfloat16_store_holds_the_rounded_weights_at_half_the_size(tiny_store, tmp_path):
    path = tmp_path / "bf16.h5"
    convert_store(tiny_store.path, str(path), "bfloat16", progress=False)
    with Store(str(path)) as b:
        assert b.store_dtype == "bfloat16" and b.f["layers/000/mlp_groups"].dtype == np.uint16
        w = tiny_store.mlp_groups(1, [2, 5])
        assert np.array_equal(b.mlp_groups(1, [2, 5]), torch.from_numpy(w).bfloat16().float().numpy())
        assert np.array_equal(b.final_norm(), tiny_store.final_norm())          # norms stay float32
    assert path.stat().st_size < 0.6 * Path(tiny_store.path).stat().st_size


def test_a_shard_of_a_quantized_store_keeps_its_records(quant_stores, tmp_path):
    from halo_mpi.store.writer import write_shard
    q, _ = quant_stores
    groups = [[1, 4, 6]] * q.args.n_layers
    write_shard(q, str(tmp_path / "s.h5"), 1, 2, groups)
    with Store(str(tmp_path / "s.h5")) as s:
        assert s.store_dtype == q.store_dtype
        assert np.array_equal(s.mlp_groups(2, [4, 6]), q.mlp_groups(2, [4, 6]))
        assert np.array_equal(s.attn_groups(0), q.attn_groups(0))
        assert np.array_equal(s.output_rows(3, 9), q.output_rows(3, 9))


def test_pipeline_split_counts_a_quantized_store_at_its_stored_size(quant_stores):
    from halo_mpi.pipeline.run import quantized_bytes
    from halo_mpi.pipeline.split import stage_costs
    q, f = quant_stores
    per_weight = quantized_bytes(q)
    assert quantized_bytes(f) is None
    assert per_weight == pytest.approx(1.0625 if q.store_dtype == "q8_0" else 0.625, rel=0.01)
    small, big = stage_costs(q.args, "float32", 64, per_weight), stage_costs(q.args, "float32", 64)
    assert small.block_bytes < 0.4 * big.block_bytes and small.kv_bytes == big.kv_bytes
