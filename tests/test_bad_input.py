"""Bad input, as a user types it or a broken disk leaves it: each case is one line
`halo-mpi...: error: ...`, exit status 2, no traceback, nothing on stdout (the error comes before
any work) and no file left behind. By category: store layout, numbers out of range, the
filesystem, device profiles, across generate, evaluate, calibrate, shard, info, convert, bench and
testbed; most run in one process (cli_batch.py), a few each in its own, and some under
mpiexec -n 2 as well: the line is printed once, not once per rank."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, halo, halo_cmd


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_store_path):
    """Files a user might hand over by mistake."""
    d = tmp_path_factory.mktemp("bad")
    (d / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (d / "empty.txt").write_text("\n\n")
    (d / "bad.toml").write_text("[rank.1\nspeed = 1\n")
    (d / "far.toml").write_text("[rank.7]\nspeed = 1\n")
    (d / "keys.toml").write_text("[rank.0]\nsped = 1\n")
    (d / "inf.toml").write_text("[default]\nspeed = inf\n")
    (d / "bool.toml").write_text("[default]\nspeed = true\n")
    (d / "rankint.toml").write_text("rank = 3\n")
    (d / "defint.toml").write_text("default = 5\n")
    (d / "mem.toml").write_text("[rank.0]\nmemory_mb = -1\n")
    (d / "rel.toml").write_text("[default]\nreliability = 0\n")
    (d / "notext.txt").write_text("  \n")
    (d / "empty_folder").mkdir()
    llama = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 256, "vocab_size": 512}
    for name, config in (("hf_noweights", llama), ("hf_mistral", {**llama, "model_type": "mistral"}),
                         ("hf_scaled", {**llama, "rope_scaling": {"rope_type": "llama3"}}),
                         ("hf_nolayers", {k: v for k, v in llama.items() if k != "num_hidden_layers"})):
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps(config))
    (d / "hf_badjson").mkdir()
    (d / "hf_badjson" / "config.json").write_text("{model_type: llama")
    (d / "fake.gguf").write_text("not a gguf\n")
    (d / "trunc.h5").write_bytes(Path(tiny_store_path).read_bytes()[:4000])
    with h5py.File(d / "other.h5", "w") as f:
        f.create_dataset("x", data=[1])
    damaged_stores(d, Path(tiny_store_path))
    return d


def edited(src: Path, dst: Path, edit):
    """A copy of the store at src, opened read-write and handed to edit(f)."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)


def replaced(name: str, data):
    def edit(f):
        del f[name]
        f.create_dataset(name, data=data)
    return edit


def damaged_stores(d: Path, tiny: Path):
    """Stores a broken disk or a hand edit leaves: each contradicts its attributes in one place."""
    with h5py.File(tiny) as f:
        mlp, attn = f["layers/001/mlp_groups"][()], f["layers/000/attn_groups"][()]
        offset = f["layers/000/mlp_groups"].id.get_offset()
    edited(tiny, d / "half.h5", replaced("layers/001/mlp_groups", mlp[:, :, :16]))   # half the neurons
    edited(tiny, d / "f64.h5", replaced("layers/000/attn_groups", attn.astype(np.float64)))
    edited(tiny, d / "layers40.h5", lambda f: f.attrs.modify("n_layers", 40))
    edited(tiny, d / "negdim.h5", lambda f: f.attrs.modify("dim", -64))
    edited(tiny, d / "layers1.h5", lambda f: f.attrs.modify("n_layers", 1))
    edited(tiny, d / "dtype8.h5", lambda f: f.attrs.__setitem__("store_dtype", "float8"))
    edited(tiny, d / "nonorm.h5", lambda f: f.__delitem__("layers/001/ffn_norm"))
    edited(tiny, d / "textdim.h5", lambda f: f.attrs.__setitem__("dim", "wide"))
    shutil.copyfile(tiny, d / "flipped.h5")          # one bit flipped inside group 3 of layer 0
    with open(d / "flipped.h5", "r+b") as f:
        f.seek(offset + 3 * mlp[0].nbytes + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


T = "{tiny}"          # stands for the tiny store's path
G = ["generate", "--weights", T, "--prompt", "x"]


def generate(store: str, *more: str) -> list[str]:
    return ["generate", "--weights", f"{{d}}/{store}", "--prompt", "x", *more]


STORE_LAYOUT = [
    (generate("half.h5"),
     "dataset /layers/001/mlp_groups has shape (8, 3, 16, 64), but the attributes ask for (8, 3, 32, 64)"),
    (generate("f64.h5"), "dataset /layers/000/attn_groups holds float64, a float32 store holds float32"),
    (generate("layers40.h5"), "dataset /layers/002/attn_norm is missing"),
    (generate("negdim.h5"), "dim -64 is not a positive size"),
    (generate("layers1.h5"), "group /layers/001 lies beyond the n_layers 1"),
    (generate("dtype8.h5"), "attribute store_dtype 'float8'"),
    (generate("nonorm.h5"), "dataset /layers/001/ffn_norm is missing"),
    (generate("textdim.h5"), "an attribute is not a number"),
    (generate("flipped.h5", "--verify"), "dataset /layers/000/mlp_groups item 3 does not match its checksum"),
    (["info", "--weights", "{d}/flipped.h5", "--verify"], "/layers/000/mlp_groups item 3 does not match"),
    (["info", "--weights", "{d}/half.h5"], "/layers/001/mlp_groups has shape"),
    (["evaluate", "--weights", "{d}/f64.h5", "--tokens", "4"], "/layers/000/attn_groups holds float64"),
    (["evaluate", "--weights", "{d}/flipped.h5", "--tokens", "4", "--verify"], "does not match its checksum"),
    (["calibrate", "--weights", "{d}/half.h5", "--quiet"], "/layers/001/mlp_groups has shape"),
    (["shard", "--weights", "{d}/layers40.h5", "--ranks", "2", "-o", "{d}/shards"], "is missing"),
    (["convert", "{d}/half.h5", "-o", "{d}/q.h5", "--store-dtype", "q8_0"], "/mlp_groups has shape"),
    (["generate", "--weights", "{d}/half.h5", "--prompt", "x", "--parallel", "pipeline"], "has shape"),
]
CASES = [            # in a process of their own each: the store and file checks, start to end
    (["generate", "--weights", "{d}/missing.h5", "--prompt", "x"], "not found"),
    (["generate", "--weights", "{d}/trunc.h5", "--prompt", "x"], "truncated"),
    (["generate", "--weights", "{d}/other.h5", "--prompt", "x"], "not a halo-mpi store"),
    (["generate", "--weights", T, "--prompt-file", "{d}/latin1.txt"], "not UTF-8"),
    (G + ["--stats-json", "{d}/no/such/folder/s.json"], "does not exist"),
    (["convert", "{d}/fake.gguf", "-o", "{d}/out.h5"], "not a readable GGUF"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]

OPTIONS = [          # the options of generate and the other commands, as argparse and the modes check them
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
    (["convert", "{d}/none.gguf", "-o", "{d}/out.h5"], "not found"),
    (["convert", "--synthetic", "tiny", "-o", "{d}/o2.h5", "--mlp-groups", "7"], "does not divide"),
    (["evaluate", "--weights", T, "--tokens", "0"], "--tokens: must be >= 1"),
    (["serve", "--weights", T, "--port", "70000"], "is not a TCP port"),
    (["bench", "--attention-drop", "2"], "give rates in [0, 1]"),
]


NUMBERS = [          # numbers out of range, checked where they are parsed
    (G + ["--threads", "-1"], "--threads: must be >= 0, got -1"),
    (G + ["--temperature", "inf"], "--temperature: must be a finite number >= 0, got inf"),
    (G + ["--temperature", "nan"], "--temperature: must be a finite number >= 0, got nan"),
    (G + ["--seed", "-1"], "--seed: must be >= 0, got -1"),
    (G + ["--rank-timeout", "inf"], "--rank-timeout: must be > 0, got inf"),
    (G + ["--progress", "nan"], "--progress: must be a finite number >= 0"),
    (G + ["--parallel", "tensor", "--deadline-factor", "nan"], "--deadline-factor: must be > 0"),
    (G + ["--parallel", "tensor", "--spin-us", "inf"], "--spin-us: must be a finite number >= 0"),
    (G + ["--read-mbps", "inf"], "--read-mbps: must be > 0, got inf"),
    (["evaluate", "--weights", T, "--threads", "-1"], "--threads: must be >= 0"),
    (["calibrate", "--weights", T, "--rank", "0"], "--rank: must be >= 1, got 0"),
    (["calibrate", "--weights", T, "--threads", "-2"], "--threads: must be >= 0"),
    (["shard", "--weights", T, "--ranks", "0"], "--ranks: must be >= 1, got 0"),
    (["shard", "--weights", T, "--ranks", "2", "--link-loss", "1:2"], "--link-loss"),
    (["convert", "--synthetic", "tiny", "-o", "{d}/s.h5", "--seed", "-1"], "--seed: must be >= 0"),
    (["bench", "--warmup", "-1"], "--warmup: must be >= 0, got -1"),
    (["bench", "--rto-min", "-5"], "--rto-min: give milliseconds in (0, 200]"),
    (["bench", "--rto-min", "500"], "--rto-min: give milliseconds in (0, 200]"),
    (["bench", "--decode", "--tokens", "0"], "--tokens: must be >= 1"),
    (["testbed", "delays", "--count", "-1"], "--count: must be >= 1, got -1"),
    (["testbed", "delays", "--interval-ms", "-1"], "--interval-ms: must be a finite number >= 0"),
    (["testbed", "delays", "--rate", "0"], "--rate: must be > 0"),
    (["testbed", "up", "--ranks", "0"], "--ranks: must be >= 1, got 0"),
    (["testbed", "up", "--rto-min", "0"], "--rto-min: give milliseconds in (0, 200]"),
    (["testbed", "run", "--timeout", "-3", "--", "generate"], "--timeout: must be > 0"),
]

FILESYSTEM = [       # a folder where a file is expected, a file where a folder is, missing ones
    (["generate", "--weights", "{d}", "--prompt", "x"], "is a folder; pass a store file"),
    (["info", "--weights", "{d}/missing.h5"], "not found"),
    (G + ["--stats-json", "{d}"], "--stats-json {d} is a folder; name a file in it"),
    (G + ["--stats-json", "{d}/latin1.txt/s.json"], "latin1.txt is a file, not a folder"),
    (["generate", "--weights", T, "--prompt-file", "{d}"], "cannot read --prompt-file {d}: Is a directory"),
    (["evaluate", "--weights", T, "--json", "{d}"], "--json {d} is a folder"),
    (["evaluate", "--weights", T, "--text", "{d}/none.txt"], "cannot read --text"),
    (["evaluate", "--weights", T, "--text", "{d}/latin1.txt"], "--text {d}/latin1.txt is not UTF-8 text"),
    (["evaluate", "--weights", T, "--text", "{d}/notext.txt"], "holds no text"),
    (["calibrate", "--weights", T, "--text", "{d}/empty_folder"], "holds no .txt or .md file"),
    (["calibrate", "--weights", T, "--report-json", "{d}"], "--report-json {d} is a folder"),
    (["convert", "--synthetic", "tiny", "-o", "{d}"], "-o {d} is a folder; name a file in it"),
    (["convert", "--synthetic", "tiny", "-o", "{d}/latin1.txt/t.h5"], "latin1.txt is a file, not a folder"),
    (["convert", T, "-o", T, "--store-dtype", "q8_0"], "is the input itself"),
    (["shard", "--weights", T, "--ranks", "2", "-o", "{d}/latin1.txt"], "latin1.txt is a file, not a folder"),
    (["convert", "{d}/empty_folder", "-o", "{d}/hf.h5"], "is a folder without config.json"),
    (["convert", "{d}/hf_noweights", "-o", "{d}/hf.h5"], "holds no .safetensors file"),
    (["convert", "{d}/hf_mistral", "-o", "{d}/hf.h5"], "model_type 'mistral' (mistral) is not supported"),
    (["convert", "{d}/hf_scaled", "-o", "{d}/hf.h5"], "rope_scaling {'rope_type': 'llama3'} is not"),
    (["convert", "{d}/hf_nolayers", "-o", "{d}/hf.h5"], "config.json lacks num_hidden_layers"),
    (["convert", "{d}/hf_badjson", "-o", "{d}/hf.h5"], "config.json is not valid JSON"),
    (["bench", "--decode", "--weights", T, "--json", "{d}"], "--json {d} is a folder"),
    (["testbed", "delays", "--json", "{d}/no/such/d.json"], "does not exist"),
]

PROFILE = [          # device profiles of the wrong shape
    (G + ["--parallel", "tensor", "--device-profile", "{d}/inf.toml"], "a number > 0 and finite"),
    (G + ["--parallel", "tensor", "--device-profile", "{d}/bool.toml"], "speed must be a number"),
    (G + ["--parallel", "tensor", "--device-profile", "{d}/rankint.toml"], "rank must be tables [rank.N]"),
    (G + ["--parallel", "tensor", "--device-profile", "{d}/defint.toml"], "[default] must be a table"),
    (G + ["--parallel", "tensor", "--device-profile", "{d}/mem.toml"], "memory_mb must be a number > 0"),
    (G + ["--parallel", "tensor", "--device-profile", "{d}/rel.toml"], "reliability must be a number in (0"),
    (["shard", "--weights", T, "--ranks", "2", "--device-profile", "{d}/inf.toml", "-o", "{d}/sh"],
     "speed must be a number > 0 and finite"),
    (["shard", "--weights", T, "--ranks", "2", "--device-profile", "{d}/rankint.toml", "-o", "{d}/sh"],
     "rank must be tables"),
]

PROMPT = [
    (["generate", "--weights", T, "--prompt", os.fsdecode(b"caf\xe9")], "--prompt is not UTF-8 text"),
]

CASES += PROMPT
BATCH = OPTIONS + STORE_LAYOUT + NUMBERS + FILESYSTEM + PROFILE     # run in one process: see cli_batch.py


def fill(args, d, tiny):
    return [a.replace("{d}", str(d)).replace("{tiny}", str(tiny)) for a in args]


def ids(cases):
    return [" ".join(a)[:60].encode("ascii", "replace").decode() for a, _ in cases]


@pytest.mark.parametrize("args, says", CASES, ids=ids(CASES))
def test_bad_input_is_one_line_and_exit_2(bad, tiny_store_path, args, says):
    before = set(bad.iterdir())
    done = halo(*fill(args, bad, tiny_store_path), timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("halo-mpi") and ": error: " in lines[0], done.stderr
    assert fill([says], bad, tiny_store_path)[0] in lines[0]
    assert done.stdout == ""                                  # before any work: nothing generated
    assert set(bad.iterdir()) == before                       # nothing half-written


@pytest.fixture(scope="module")
def batch(bad, tiny_store_path):
    """BATCH's command lines run in one process, and the files of `bad` before and after."""
    before = set(bad.iterdir())
    argvs = [fill(args, bad, tiny_store_path) for args, _ in BATCH]
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_batch.py")], input=json.dumps(argvs),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return dict(zip(map(tuple, argvs), json.loads(done.stdout))), before, set(bad.iterdir())


@pytest.mark.parametrize("args, says", BATCH, ids=ids(BATCH))
def test_bad_input_by_category_is_one_line_before_any_work(batch, bad, tiny_store_path, args, says):
    """Store layout, numbers out of range, the filesystem, device profiles, in every subcommand:
    one line, exit status 2, nothing printed on stdout (no work done) and no file written."""
    results, before, after = batch
    r = results[tuple(fill(args, bad, tiny_store_path))]
    lines = r["stderr"].strip().splitlines()
    assert r["code"] == 2, r["stderr"]
    assert len(lines) == 1 and lines[0].startswith("halo-mpi") and ": error: " in lines[0], r["stderr"]
    assert fill([says], bad, tiny_store_path)[0] in lines[0]
    assert r["stdout"] == ""
    assert after == before                                      # nothing half-written


@pytest.mark.parametrize("args, says", [
    (G + ["--parallel", "tensor", "--sync", "maybe"], "invalid choice"),
    (G + ["--parallel", "tensor", "--link-loss", "1:1.5"], "--link-loss"),
    (["generate", "--weights", "{d}/other.h5", "--prompt", "x", "--parallel", "tensor"],
     "not a halo-mpi store"),
    (G, "choose --parallel tensor or --parallel pipeline"),          # no mode for 2 ranks
    (generate("half.h5", "--parallel", "tensor"), "/layers/001/mlp_groups has shape"),
    (generate("f64.h5", "--parallel", "tensor"), "/layers/000/attn_groups holds float64"),
    (generate("flipped.h5", "--parallel", "tensor", "--verify"), "does not match its checksum"),
    (generate("layers40.h5", "--parallel", "pipeline"), "dataset /layers/002/attn_norm is missing"),
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


def without_privilege() -> list[str]:
    """A prefix that runs a command with file permissions enforced: root bypasses them unless its
    capabilities to do so are dropped (setpriv, util-linux)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("args, says", [
    (["generate", "--weights", "{d}/locked.h5", "--prompt", "x"], "cannot read {d}/locked.h5: Permission"),
    (["info", "--weights", "{d}/locked.h5"], "cannot read {d}/locked.h5: Permission denied"),
    (["convert", "--synthetic", "tiny", "-o", "{d}/ro/t.h5"], "the folder {d}/ro is not writable (perm"),
    (G + ["--stats-json", "{d}/ro/s.json"], "the folder {d}/ro is not writable"),
    (G + ["--stats-json", "{d}/kept.json"], "--stats-json {d}/kept.json exists and is read-only"),
    (["shard", "--weights", T, "--ranks", "2", "-o", "{d}/ro"], "the folder {d}/ro is not writable"),
])
def test_file_permissions_are_named(tmp_path, tiny_store_path, args, says):
    shutil.copyfile(tiny_store_path, tmp_path / "locked.h5")
    (tmp_path / "locked.h5").chmod(0)
    (tmp_path / "kept.json").write_text("{}")
    (tmp_path / "kept.json").chmod(0o444)
    (tmp_path / "ro").mkdir(mode=0o555)
    try:
        done = subprocess.run(without_privilege() + halo_cmd(*fill(args, tmp_path, tiny_store_path)),
                              capture_output=True, text=True, timeout=120)
    finally:
        (tmp_path / "ro").chmod(0o755)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert fill([says], tmp_path, tiny_store_path)[0] in lines[0]
    assert os.listdir(tmp_path / "ro") == []


def test_a_read_only_file_system_is_named(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    try:
        done = halo("convert", "--synthetic", "tiny", "-o", mount / "t.h5", timeout=120)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"the folder {mount} is on a read-only file system" in lines[0]
