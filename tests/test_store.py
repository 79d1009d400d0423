"""The HDF5 layout: groups reassemble the original matrices, subsets read the right rows."""
import os

import h5py
import numpy as np
import pytest

from halo_mpi.errors import HaloError
from halo_mpi.model.config import ModelArgs
from halo_mpi.store.convert import cut_attn_groups, cut_mlp_groups, unpermute_rope
from halo_mpi.store.reader import pread_into


def llama_cpp_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows, the inverse of unpermute_rope."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((9 * 64, 20)).astype(np.float32)
    assert np.array_equal(unpermute_rope(llama_cpp_permute(w, 9), 9), w)
    assert not np.array_equal(llama_cpp_permute(w, 9), w)


def test_mlp_groups_reassemble_matrices():
    args = ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=12, vocab_size=4, mlp_groups=3)
    rng = np.random.default_rng(0)
    gate, up, down = rng.standard_normal((12, 8)), rng.standard_normal((12, 8)), rng.standard_normal((8, 12))
    g = cut_mlp_groups(args, gate, up, down)
    assert g.shape == (3, 3, 4, 8)
    assert np.array_equal(g[1, 0], gate[4:8]) and np.array_equal(g[1, 1], up[4:8])
    assert np.array_equal(g[1, 2], down[:, 4:8].T)


def test_attn_groups_hold_their_heads():
    args = ModelArgs(dim=8, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=4, vocab_size=4)
    rng = np.random.default_rng(0)
    wq, wk, wv, wo = (rng.standard_normal(s) for s in [(8, 8), (4, 8), (4, 8), (8, 8)])
    g = cut_attn_groups(args, wq, wk, wv, wo)       # hd = 2, n_rep = 2
    assert g.shape == (2, 12, 8)
    assert np.array_equal(g[1, :4], wq[4:8])        # query heads 2, 3 belong to KV head 1
    assert np.array_equal(g[1, 4:6], wk[2:4]) and np.array_equal(g[1, 6:8], wv[2:4])
    assert np.array_equal(g[1, 8:], wo[:, 4:8].T)


def test_store_attributes_round_trip(tiny_store):
    a = tiny_store.args
    assert (a.dim, a.n_layers, a.mlp_groups, a.group_size) == (64, 2, 8, 32)
    with h5py.File(tiny_store.path, "r") as f:
        assert f["layers/001/mlp_groups"].shape == (8, 3, 32, 64)
        assert f["layers/001/attn_groups"].shape == (2, (2 * 2 + 2) * 16, 64)
        assert f["layers/001/mlp_groups"].chunks is None        # contiguous: one group, one read


@pytest.mark.parametrize("ids", [[2, 3, 4], [6, 1, 3], [7]])
def test_reading_a_subset_of_groups(tiny_store, ids):
    every = tiny_store.mlp_groups(0)
    assert np.array_equal(tiny_store.mlp_groups(0, ids), every[ids])


def test_reading_groups_not_held_is_an_error(tiny_store):
    with pytest.raises(HaloError, match="does not hold"):
        tiny_store.mlp_groups(0, [8])


def test_pread_into_reads_groups_at_their_file_offset(tiny_store, tmp_path):
    """Contiguous datasets: group g lies at offset + g * group_bytes, the bytes h5py reads."""
    with h5py.File(tiny_store.path, "r") as f:
        ds = f["layers/001/mlp_groups"]
        offset, want = ds.id.get_offset(), ds[2:5]
    got = np.empty_like(want)
    fd = os.open(tiny_store.path, os.O_RDONLY)
    try:
        pread_into(fd, got, offset + 2 * want[0].nbytes, "the store ends inside a group")
    finally:
        os.close(fd)
    assert np.array_equal(got, want)
    short = tmp_path / "short.bin"
    short.write_bytes(b"0123456789")
    fd = os.open(short, os.O_RDONLY)
    try:
        buf = bytearray(4)
        pread_into(fd, buf, 3, "ends early")
        assert buf == b"3456"
        with pytest.raises(HaloError, match="ends early"):     # the file ends inside the read
            pread_into(fd, bytearray(4), 8, "ends early")
    finally:
        os.close(fd)


def test_groups_that_do_not_divide_the_intermediate_size():
    with pytest.raises(HaloError, match="does not divide the intermediate size 1536"):
        ModelArgs(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=10,
                  mlp_groups=7)


@pytest.mark.slow
def test_real_store_shapes(real_store):
    a = real_store.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.hidden_dim, a.vocab_size) == \
        (576, 30, 9, 3, 1536, 49152)
    assert a.tied_embeddings and a.rope_theta == 100000.0
    assert 134e6 < a.n_params() < 135e6


@pytest.mark.parametrize("store_dtype", ["float32", "bfloat16", "q4"])
def test_checksums_catch_a_flipped_bit_in_any_store_dtype(tmp_path, store_dtype):
    """Each item (a group, a row) has its CRC-32: a read of an intact item passes, a read that
    touches the damaged one names it; the layout check at open does not read weights at all."""
    from halo_mpi.store.convert import write_synthetic
    from halo_mpi.store.hdf5 import Store
    path = tmp_path / "t.h5"
    write_synthetic("tiny", str(path), mlp_groups=8, progress=False, store_dtype=store_dtype)
    with Store(str(path), verify=True) as s:
        intact = s.mlp_groups(1, [2, 5])
        item = s.item_bytes("mlp")
        offset = s.f["layers/001/mlp_groups"].id.get_offset()
    with open(path, "r+b") as f:                              # flip one bit of group 5 of layer 1
        f.seek(offset + 5 * item + item // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 1]))
    with Store(str(path)) as s:                               # unverified: opens and reads
        assert np.array_equal(s.mlp_groups(1, [2]), intact[:1])
        s.verify = True
        assert np.array_equal(s.mlp_groups(1, [2]), intact[:1])
        with pytest.raises(HaloError, match="/layers/001/mlp_groups item 5 does not match"):
            s.mlp_groups(1, [2, 5])
    with pytest.raises(HaloError, match="item 5 does not match"):
        Store(str(path), verify=True)


def test_a_store_without_checksums_is_refused_only_when_verifying(tmp_path, tiny_store_path):
    from halo_mpi.store.hdf5 import Store
    path = tmp_path / "old.h5"
    path.write_bytes(open(tiny_store_path, "rb").read())
    with h5py.File(path, "r+") as f:
        del f["checksums"]
    Store(str(path)).close()
    with pytest.raises(HaloError, match="holds no /checksums"):
        Store(str(path), verify=True)
