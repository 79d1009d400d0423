"""Shared fixtures: a tiny synthetic store (built per process) and the real SmolLM2 store.

Tests that need the real model are marked `slow`; without the files they skip, unless
HALO_REQUIRE_WEIGHTS=1 (set by `make test` and CI), where a missing file is a failure.
"""
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL_STORE = ROOT / "weights" / "smollm2-135m.h5"
REAL_GGUF = ROOT / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"
HALO = [sys.executable, "-m", "halo_mpi.cli"]


def _require(path: Path):
    if path.exists():
        return path
    msg = f"{path} is missing: run `make weights`"
    if os.environ.get("HALO_REQUIRE_WEIGHTS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def real_store_path():
    return _require(REAL_STORE)


@pytest.fixture(scope="session")
def real_gguf_path():
    return _require(REAL_GGUF)


@pytest.fixture(scope="session")
def real_store(real_store_path):
    from halo_mpi.store.hdf5 import Store
    with Store(str(real_store_path)) as s:
        yield s


@pytest.fixture(scope="session")
def real_model(real_store):
    from halo_mpi.model.llama import Transformer
    return Transformer.from_store(real_store)


@pytest.fixture(scope="session")
def tiny_store_path(tmp_path_factory):
    """A 2-layer random-weight model with 8 MLP groups (per process: ranks do not share it)."""
    from halo_mpi.store.convert import write_synthetic
    path = tmp_path_factory.mktemp("tiny") / "tiny.h5"
    write_synthetic("tiny", str(path), mlp_groups=8, seed=1, progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_store(tiny_store_path):
    from halo_mpi.store.hdf5 import Store
    with Store(str(tiny_store_path)) as s:
        yield s


@pytest.fixture(scope="session")
def kv3_store(tmp_path_factory):
    """3 layers with 3 KV heads (as SmolLM2) and an untied head (per process, like tiny_store)."""
    from halo_mpi.store.convert import write_synthetic
    from halo_mpi.store.hdf5 import Store
    path = tmp_path_factory.mktemp("kv3") / "kv3.h5"
    write_synthetic("tiny-3kv", str(path), mlp_groups=8, seed=3, progress=False)
    with Store(str(path)) as s:
        yield s


def pid_of_rank(mark: str, rank: int):
    """The pid of MPI rank `rank` of the run launched with HALO_TEST_MARK=mark in its environment."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"HALO_TEST_MARK={mark}".encode() in env and f"PMI_RANK={rank}".encode() in env:
            return int(pid)
    return None


@contextmanager
def launched(cmd: list[str], **popen):
    """A process with its stdout and stderr piped (text), killed and reaped if still running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


REAL_FIXTURES = {"real_store_path", "real_gguf_path", "real_store", "real_model"}


def pytest_collection_modifyitems(items):
    """A test that needs the real model must say so with the `slow` mark (CI selects by it)."""
    unmarked = [item.nodeid for item in items
                if REAL_FIXTURES & set(getattr(item, "fixturenames", ())) and "slow" not in item.keywords]
    if unmarked:
        raise pytest.UsageError(f"tests use the real model without @pytest.mark.slow: {unmarked}")
