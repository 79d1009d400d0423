"""Processes on a testbed: its MPI job, started in a session of its own and stopped as a whole,
and signal handling that turns SIGTERM into an exception and lets every cleanup run to its end."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextlib import contextmanager

STOP_GRACE = 5.0                # seconds mpiexec gets to end its ranks after SIGINT


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, turned into an exception so that every cleanup path runs."""


@contextmanager
def signals_interrupt():
    """While inside, SIGTERM and SIGHUP raise Interrupted (when nobody else handles them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    replaced = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            replaced[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, old in replaced.items():
            signal.signal(sig, old)


@contextmanager
def shielded():
    """While inside (a cleanup), Ctrl-C, SIGTERM and SIGHUP are ignored: cleanup runs to its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)

def run_job(cmd: list[str], env: dict[str, str], timeout: float | None,
            capture: bool) -> subprocess.CompletedProcess:
    """Run cmd to its end; a timeout, Ctrl-C or SIGTERM stops it whole (stop_job) and raises."""
    pipe = subprocess.PIPE if capture else None
    with signals_interrupt():
        # its own session: Ctrl-C reaches us only, and we stop the job as a whole
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=pipe,
                                stderr=pipe, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            stop_job(proc)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stop_job(proc: subprocess.Popen):
    """SIGINT to mpiexec's process group (it ends its ranks), then SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGINT, STOP_GRACE), (signal.SIGKILL, STOP_GRACE)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def process_identity(pid: int) -> list[int] | None:
    """[pid, start time in clock ticks]: unlike a bare pid, never matches a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return [pid, int(f.read().rsplit(")", 1)[1].split()[19])]
    except (OSError, IndexError, ValueError):
        return None
