"""Reading groups with pread at their file offsets: the same bytes as h5py, paced when asked."""
import os
import time

import numpy as np
import pytest

from halo_mpi.errors import HaloError
from halo_mpi.store.convert import convert_store
from halo_mpi.store.hdf5 import Store
from halo_mpi.store.reader import GroupReader


@pytest.mark.parametrize("dtype", ["float32", "q4"])
def test_pread_reads_what_h5py_reads(tiny_store_path, tmp_path, dtype):
    path = str(tiny_store_path)
    if dtype != "float32":
        path = str(tmp_path / f"{dtype}.h5")
        convert_store(str(tiny_store_path), path, dtype, progress=False)
    with Store(path) as s, GroupReader(path, "layers/001/mlp_groups") as r:
        assert r.shape[0] == s.args.mlp_groups
        got = r.read(2, 5)
        want = s.f["layers/001/mlp_groups"][2:5]
        assert got.dtype == want.dtype and np.array_equal(got, want)
        assert r.bytes_read == 3 * r.group_bytes
        with GroupReader(path, "embedding") as rows:
            assert np.array_equal(rows.read(7, 8), s.f["embedding"][7:8])
        r.drop_cache()                                      # cold reads give the same bytes
        assert np.array_equal(r.read(0, s.args.mlp_groups), s.f["layers/001/mlp_groups"][()])


def test_read_mbps_paces_reads(tiny_store_path):
    with GroupReader(str(tiny_store_path), "layers/000/mlp_groups", read_mbps=2.0) as r:
        t0 = time.perf_counter()
        r.read(0, 8)                                        # 8 groups of 98 KB: ~0.39 s at 2 MB/s
        took = time.perf_counter() - t0
    assert took >= 8 * r.group_bytes / 2e6 * 0.95


def test_a_truncated_store_or_a_bad_range_is_one_clear_error(tiny_store_path, tmp_path):
    with GroupReader(str(tiny_store_path), "layers/001/mlp_groups") as r:
        with pytest.raises(HaloError, match="outside"):
            r.read(0, r.shape[0] + 1)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(tiny_store_path.read_bytes())
    with GroupReader(str(cut), "layers/001/mlp_groups") as r:
        os.truncate(cut, r.offset + r.group_bytes + 100)     # the file ends inside group 1
        assert r.read(0, 1).shape[0] == 1
        with pytest.raises(HaloError, match="truncated"):
            r.read(0, 2)
