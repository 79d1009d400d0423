"""Files a command writes, checked before any work: a missing or read-only folder, a folder where
a file is expected, a file that cannot be replaced, each named as such on one line."""
from __future__ import annotations

import errno
import os

from ..errors import HaloError


def check_output(option: str, path: str, make_folder: bool = False):
    """`path` can be written (created, or replaced); with make_folder its folder may be made."""
    if os.path.isdir(path):
        raise HaloError(f"{option} {path} is a folder; name a file in it")
    check_folder(option, path, os.path.dirname(os.path.abspath(path)), make_folder)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise HaloError(f"{option} {path} exists and is read-only")


def check_folder(option: str, given: str, folder: str, make: bool = False):
    """`folder` (what `option` `given` names or lies in) exists, or is made, and is writable."""
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise HaloError(f"{option} {given}: {folder} is a file, not a folder")
        if not make:
            raise HaloError(f"{option} {given}: the folder {folder} does not exist")
        try:
            os.makedirs(folder)
        except OSError as e:
            raise HaloError(f"{option} {given}: cannot make the folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        why = "on a read-only file system" if _read_only(folder) else "not writable (permission denied)"
        raise HaloError(f"{option} {given}: the folder {folder} is {why}")


def _read_only(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError as e:
        return e.errno == errno.EROFS
