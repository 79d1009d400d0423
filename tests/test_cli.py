"""The command line: generation, --help, and one clear line with a non-zero exit for bad input."""
import shutil

import h5py
import pytest
from conftest import halo
from tiny_gguf import write_tiny_gguf

from halo_mpi.cli.main import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("halo-mpi: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("sub", ["fetch-weights", "convert", "generate", "info"])
def test_help_of_every_subcommand(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert "usage: halo-mpi " + sub in capsys.readouterr().out


def test_greedy_generation_is_deterministic(tiny_store_path, capsys):
    argv = ["generate", "--weights", tiny_store_path, "--prompt", "hello", "--max-new-tokens", 8,
            "--temperature", 0, "--quiet"]
    code, out1, err = run(capsys, *argv)
    assert code == 0 and "ms/token" in err and "tokens/s" in err and "prefill" in err
    _, out2, _ = run(capsys, *argv)
    assert out1 == out2 and out1.strip()


def test_seeded_sampling_is_reproducible(tiny_store_path, capsys):
    argv = ["generate", "--weights", tiny_store_path, "--prompt", "hi", "--max-new-tokens", 12,
            "--temperature", 1.0, "--top-p", 0.95, "--quiet"]
    a = run(capsys, *argv, "--seed", 1)[1]
    b = run(capsys, *argv, "--seed", 1)[1]
    c = run(capsys, *argv, "--seed", 2)[1]
    assert a == b and a != c


def test_missing_weights(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--weights", tmp_path / "nope.h5", "--prompt", "x")
    assert_one_line_error(code, err, "nope.h5", "not found")


def test_truncated_store(capsys, tmp_path, tiny_store_path):
    bad = tmp_path / "cut.h5"
    data = tiny_store_path.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "generate", "--weights", bad, "--prompt", "x")
    assert_one_line_error(code, err, "cut.h5", "truncated")


def test_hdf5_that_is_not_a_store(capsys, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2, 3]
    code, _, err = run(capsys, "generate", "--weights", other, "--prompt", "x")
    assert_one_line_error(code, err, "not a halo-mpi store")


def test_file_that_is_not_hdf5(capsys, tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_text("hello")
    code, _, err = run(capsys, "generate", "--weights", junk, "--prompt", "x")
    assert_one_line_error(code, err, "not an HDF5 file")


def test_store_of_another_layout_version(capsys, tmp_path, tiny_store_path):
    old = tmp_path / "old.h5"
    shutil.copy(tiny_store_path, old)
    with h5py.File(old, "r+") as f:
        f.attrs["layout_version"] = 99
    code, _, err = run(capsys, "generate", "--weights", old, "--prompt", "x")
    assert_one_line_error(code, err, "layout version 99")


def test_gguf_of_unsupported_architecture(capsys, tmp_path):
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    code, _, err = run(capsys, "convert", tmp_path / "gpt2.gguf", "-o", tmp_path / "out.h5")
    assert_one_line_error(code, err, "'gpt2' is not supported")
    assert not (tmp_path / "out.h5").exists()


def test_truncated_gguf(capsys, tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf")
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) * 2 // 3])
    code, _, err = run(capsys, "convert", tmp_path / "t.gguf", "-o", tmp_path / "out.h5")
    assert_one_line_error(code, err, "t.gguf")
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.partial").exists()


def test_missing_gguf(capsys, tmp_path):
    code, _, err = run(capsys, "convert", tmp_path / "none.gguf", "-o", tmp_path / "out.h5")
    assert_one_line_error(code, err, "none.gguf", "fetch-weights")


def test_groups_that_do_not_divide(capsys, tmp_path):
    code, _, err = run(capsys, "convert", "--synthetic", "tiny", "--mlp-groups", 7, "-o", tmp_path / "t.h5")
    assert_one_line_error(code, err, "--mlp-groups 7", "256")
    write_tiny_gguf(tmp_path / "t.gguf")
    code, _, err = run(capsys, "convert", tmp_path / "t.gguf", "--mlp-groups", 5, "-o", tmp_path / "t.h5")
    assert_one_line_error(code, err, "--mlp-groups 5", "64")


def test_prompt_longer_than_the_context(capsys, tiny_store_path):
    code, _, err = run(capsys, "generate", "--weights", tiny_store_path, "--prompt", "x" * 300)
    assert_one_line_error(code, err, "300 tokens", "context is 256")


def test_prompt_options(capsys, tiny_store_path, tmp_path):
    code, _, err = run(capsys, "generate", "--weights", tiny_store_path)
    assert_one_line_error(code, err, "--prompt")
    code, _, err = run(capsys, "generate", "--weights", tiny_store_path, "--prompt-file", tmp_path / "no.txt")
    assert_one_line_error(code, err, "no.txt")
    (tmp_path / "p.txt").write_text("abc")
    assert run(capsys, "generate", "--weights", tiny_store_path, "--prompt-file", tmp_path / "p.txt",
               "--max-new-tokens", 2, "--quiet")[0] == 0


@pytest.mark.slow
def test_mpiexec_n1_generates_paris(real_store_path):
    """The issue's check, launched the way users launch it (a subprocess with a timeout)."""
    done = halo("generate", "--weights", real_store_path, "--prompt", "The capital of France is",
                "--max-new-tokens", 20, "--temperature", 0, ranks=1, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("The capital of France is Paris")
    assert "ms/token" in done.stderr
