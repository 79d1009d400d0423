"""Shared fixtures and helpers: tiny synthetic stores (built per process), the real SmolLM2
store, and the command line run in a subprocess (`halo`, under mpiexec with `ranks`).

Tests that need the real model are marked `slow`; without the files they skip, unless
HALO_REQUIRE_WEIGHTS=1 (set by `make test` and CI), where a missing file is a failure.
"""
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from halo_mpi.net.launch import mpiexec_path

ROOT = Path(__file__).resolve().parent.parent
REAL_STORE = ROOT / "weights" / "smollm2-135m.h5"
REAL_GGUF = ROOT / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"
HALO = [sys.executable, "-m", "halo_mpi.cli"]
MPIEXEC = mpiexec_path()


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


def open_store(path):
    """Yields the store at `path`, open for the fixture's lifetime (`yield from open_store(...)`)."""
    from halo_mpi.store.hdf5 import Store
    with Store(str(path)) as s:
        yield s


def synthetic_store(tmp_path_factory, shape: str, **options) -> Path:
    """A random-weight store of the synthetic `shape` in a fresh temporary folder; `options`:
    write_synthetic's (mlp_groups, seed). Built per process (ranks do not share it); its seed
    gives every rank the same bytes."""
    from halo_mpi.store.convert import write_synthetic
    path = tmp_path_factory.mktemp(shape) / f"{shape}.h5"
    write_synthetic(shape, str(path), progress=False, **options)
    return path


@pytest.fixture(scope="session")
def real_store(real_store_path):
    yield from open_store(real_store_path)


@pytest.fixture(scope="session")
def real_model(real_store):
    from halo_mpi.model.llama import Transformer
    return Transformer.from_store(real_store)


@pytest.fixture(scope="session")
def tiny_store_path(tmp_path_factory):
    """A 2-layer random-weight model with 8 MLP groups."""
    return synthetic_store(tmp_path_factory, "tiny", mlp_groups=8, seed=1)


@pytest.fixture(scope="session")
def tiny_store(tiny_store_path):
    yield from open_store(tiny_store_path)


@pytest.fixture(scope="session")
def kv3_store(tmp_path_factory):
    """3 layers with 3 KV heads (as SmolLM2) and an untied head."""
    yield from open_store(synthetic_store(tmp_path_factory, "tiny-3kv", mlp_groups=8, seed=3))


@pytest.fixture(scope="session")
def deep_store_path(tmp_path_factory):
    """tiny with 8 layers: a pipeline of up to 8 ranks gets a block on each."""
    return synthetic_store(tmp_path_factory, "tiny-8l", mlp_groups=4, seed=3)


@pytest.fixture(scope="session")
def deep_store(deep_store_path):
    yield from open_store(deep_store_path)


def halo_cmd(*argv, ranks: int | None = None, launch: tuple[str, ...] = ()) -> list[str]:
    """The command line `halo-mpi argv...` (items made strings); with `ranks`, under
    `mpiexec [launch...] -n ranks`."""
    cmd = [*HALO, *map(str, argv)]
    return cmd if ranks is None else [MPIEXEC, *launch, "-n", str(ranks), *cmd]


def halo(*argv, ranks: int | None = None, timeout: float = 300, env: dict | None = None,
         launch: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Runs halo_cmd(argv...) to its end with a timeout: stdout and stderr captured as text, `env`
    over this process's environment."""
    return subprocess.run(halo_cmd(*argv, ranks=ranks, launch=launch), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def pid_of_rank(mark: str, rank: int) -> int | None:
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
