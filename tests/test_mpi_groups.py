"""Under mpiexec: each rank reads only its own neuron groups; the partial MLPs sum to the full one."""
import numpy as np
import pytest
import torch

from halo_mpi.model.groups import GroupMLP


@pytest.mark.mpi(min_size=2)
def test_partials_from_each_ranks_groups_sum_to_the_full_mlp(tiny_store):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    G = tiny_store.args.mlp_groups
    mine = np.array_split(np.arange(G), comm.size)[comm.rank]     # this rank's group ids
    x = np.random.default_rng(7).standard_normal((2, tiny_store.args.dim)).astype(np.float32)
    x = torch.from_numpy(x)
    partial = GroupMLP(tiny_store.mlp_groups(1, mine), mine)(x).numpy()
    total = np.empty_like(partial)
    comm.Allreduce(partial, total, op=MPI.SUM)
    full = GroupMLP(tiny_store.mlp_groups(1))(x).numpy()
    np.testing.assert_allclose(total, full, atol=1e-5)
    # every rank held a distinct, non-empty share
    shares = comm.allgather(mine.tolist())
    assert sorted(sum(shares, [])) == list(range(G)) and all(shares)
