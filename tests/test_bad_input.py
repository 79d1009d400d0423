"""Bad input, as a user types it: each case is one line `halo-mpi...: error: ...`, exit status 2,
within 10 s, no traceback, and no file left behind. A few run under mpiexec -n 2 as well: the
line is printed once, not once per rank."""
import os
import subprocess
import time
from pathlib import Path

import h5py
import pytest
from conftest import ROOT, halo


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_store_path):
    """Files a user might hand over by mistake."""
    d = tmp_path_factory.mktemp("bad")
    (d / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (d / "empty.txt").write_text("\n\n")
    (d / "bad.toml").write_text("[rank.1\nspeed = 1\n")
    (d / "far.toml").write_text("[rank.7]\nspeed = 1\n")
    (d / "keys.toml").write_text("[rank.0]\nsped = 1\n")
    (d / "fake.gguf").write_text("not a gguf\n")
    (d / "trunc.h5").write_bytes(Path(tiny_store_path).read_bytes()[:4000])
    with h5py.File(d / "other.h5", "w") as f:
        f.create_dataset("x", data=[1])
    return d


T = "{tiny}"          # stands for the tiny store's path
G = ["generate", "--weights", T, "--prompt", "x"]
CASES = [
    (["generate", "--weights", "{d}/missing.h5", "--prompt", "x"], "not found"),
    (["generate", "--weights", "{d}/trunc.h5", "--prompt", "x"], "truncated"),
    (["generate", "--weights", "{d}/other.h5", "--prompt", "x"], "not a halo-mpi store"),
    (["generate", "--weights", T, "--prompt-file", "{d}/latin1.txt"], "not UTF-8"),
    (["generate", "--weights", T, "--prompt-file", "{d}/empty.txt"], "holds no prompt"),
    (["generate", "--weights", T, "--prompt-file", "{d}/none.txt"], "cannot read --prompt-file"),
    (["generate", "--weights", T], "give --prompt"),
    (G + ["--prompt-file", "{d}/latin1.txt"], "give --prompt"),
    (G + ["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
    (G + ["--top-p", "2"], "--top-p: must be in (0, 1]"),
    (G + ["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (G + ["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["generate", "--weights", T, "--prompt", "word " * 400], "the model's context is 256"),
    (G + ["--dtype", "float8"], "invalid choice: 'float8'"),
    (G + ["--parallel", "tensor", "--sync", "maybe"], "invalid choice: 'maybe'"),
    (G + ["--parallel", "tensor", "--link-loss", "9:0.1"], "names rank 9"),
    (G + ["--parallel", "tensor", "--link-loss", "1"], "--link-loss"),
    (G + ["--parallel", "tensor", "--critical-share", "0"], "--critical-share: must be in (0, 1], got 0"),
    (G + ["--parallel", "tensor", "--sparsity", "1"], "--sparsity: must be in [0, 1), got 1"),
    (G + ["--parallel", "tensor", "--backup-share", "2"], "--backup-share: must be in [0, 1], got 2"),
    (G + ["--parallel", "tensor", "--drop-budget", "0"], "--drop-budget: must be in (0, 1], got 0"),
    (G + ["--parallel", "tensor", "--device-profile", "{d}/bad.toml"], "is not valid TOML"),
    (G + ["--parallel", "tensor", "--device-profile", "{d}/far.toml"], "describes [rank.7]"),
    (G + ["--parallel", "tensor", "--device-profile", "{d}/keys.toml"], "sped"),
    (G + ["--parallel", "tensor", "--device-profile", "{d}/none.toml"], "cannot read --device-profile"),
    (G + ["--prefill-chunk", "0"], "--prefill-chunk: must be >= 1"),
    (G + ["--wire-dtype", "int4"], "invalid choice: 'int4'"),
    (G + ["--mem-budget", "lots"], "give a size (150MB, 1.5GB) or a share"),
    (G + ["--mem-budget", "150%"], "a share is at most 100%"),
    (G + ["--mem-budget", "1KB"], "is too small for this rank: it needs at least"),
    (G + ["--parallel", "tensor", "--mem-budget", "50%", "--backup-share", "0.5"], "not with --mem-budget"),
    (G + ["--read-mbps", "0"], "--read-mbps: must be > 0"),
    (G + ["--stats-json", "{d}/no/such/folder/s.json"], "does not exist"),
    (["convert", "{d}/fake.gguf", "-o", "{d}/out.h5"], "not a readable GGUF"),
    (["convert", "{d}/none.gguf", "-o", "{d}/out.h5"], "not found"),
    (["convert", "--synthetic", "tiny", "-o", "{d}/o2.h5", "--mlp-groups", "7"], "does not divide"),
    (["evaluate", "--weights", T, "--tokens", "0"], "--tokens: must be >= 1"),
    (["serve", "--weights", T, "--port", "70000"], "is not a TCP port"),
    (["bench", "--attention-drop", "2"], "give rates in [0, 1]"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


def fill(args, d, tiny):
    return [a.replace("{d}", str(d)).replace("{tiny}", str(tiny)) for a in args]


@pytest.mark.parametrize("args, says", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(bad, tiny_store_path, args, says):
    before = set(bad.iterdir())
    t0 = time.monotonic()
    done = halo(*fill(args, bad, tiny_store_path), timeout=10)
    took = time.monotonic() - t0
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("halo-mpi") and ": error: " in lines[0], done.stderr
    assert says in lines[0]
    assert took < 10
    assert set(bad.iterdir()) == before                       # nothing half-written


@pytest.mark.parametrize("args, says", [
    (G + ["--parallel", "tensor", "--sync", "maybe"], "invalid choice"),
    (G + ["--parallel", "tensor", "--link-loss", "1:1.5"], "--link-loss"),
    (["generate", "--weights", "{d}/other.h5", "--prompt", "x", "--parallel", "tensor"],
     "not a halo-mpi store"),
    (G, "choose --parallel tensor or --parallel pipeline"),          # no mode for 2 ranks
    (["serve", "--weights", T], "choose --parallel tensor or --parallel pipeline"),
])
def test_under_mpiexec_the_line_is_printed_once(bad, tiny_store_path, args, says):
    done = halo(*fill(args, bad, tiny_store_path), ranks=2, timeout=60)
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and says in lines[0], done.stderr


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_no_file(full_disk, tiny_store_path):
    done = halo("convert", "--synthetic", "tiny", "--mlp-groups", 8, "-o", full_disk / "t.h5", "--quiet",
                timeout=10)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "cannot write" in lines[0] and "No space left on device" in lines[0]
    assert list(full_disk.iterdir()) == []
    fd = os.open(full_disk / "ballast", os.O_WRONLY | os.O_CREAT)   # --stats-json at the end: no room
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    os.close(fd)
    done = halo("generate", "--weights", tiny_store_path, "--prompt", "hi", "--max-new-tokens", 4,
                "--stats-json", full_disk / "s.json", timeout=10)
    assert done.returncode == 2 and done.stdout.strip(), done.stderr      # the text came out first
    assert "cannot write" in done.stderr and "No space left on device" in done.stderr
    assert sorted(p.name for p in full_disk.iterdir()) == ["ballast"]


def check_hostfile(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "jobs" / "check-hostfile.sh"), str(path)],
                          capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("text, says", [
    ("localhost:2\nnosuchhost.invalid:1\n", "host nosuchhost.invalid does not resolve"),
    ("localhost:x\n", "slots must be a whole number"),
    ("# only a comment\n\n", "lists no host"),
])
def test_a_bad_hostfile_is_one_line_before_mpiexec(tmp_path, text, says):
    """The launch scripts check the hostfile first (hydra's own failure is a five-line dump)."""
    (tmp_path / "hosts").write_text(text)
    done = check_hostfile(tmp_path / "hosts")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr
    (tmp_path / "good").write_text("localhost:2\n# rank 0 first\n127.0.0.1\n")
    assert check_hostfile(tmp_path / "good").returncode == 0
