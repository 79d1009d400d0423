"""Real lossy links on one machine: one network namespace per rank, kernel packet drops, rate caps.

    halo-mpi testbed up --ranks 4 --loss 2:0.05,3:0.05 --name demo
    halo-mpi testbed run --name demo -- generate --parallel tensor --sync strict --prompt "Hi"
    halo-mpi testbed down --name demo
    halo-mpi testbed run --ranks 2 --loss 1:0.2 -- generate ...    # a testbed for one run only
    halo-mpi testbed delays --loss 0,0.01,0.03,0.05                # arrival delays under loss

Layout (names carry the prefix `halotb-<name>-`, so several testbeds never collide):

    namespace halotb-<name>-hub     bridge `hbr`, one port `v<rank>` per rank
    namespace halotb-<name>-r<rank> interface `halo0`, address 198.18.0.<rank+1>/24

Every rank's interface has the same name, so one FI_TCP_IFACE=halo0 serves all ranks. The
addresses come from 198.18.0.0/15 (RFC 2544, reserved for benchmarking networks) and exist only on
the testbed's own bridge, inside its namespaces: the root namespace gets no link, address, route,
rule or qdisc, and no packet can leave the testbed. Deleting the namespaces removes everything.

Loss on rank k, probability P, models a flaky access link of that rank: every TCP packet to or
from rank k is dropped with probability P, once per direction. The drop is made where the packet
arrives (INPUT in rank k's namespace for traffic to k; INPUT with `-s <k's address>` in every
other rank's namespace for traffic from k), never on the way out: the kernel reports an OUTPUT
drop to the sending TCP as a send error, which it then simply retries, with no timeout; a loss on
a wire is silent, as a drop on arrival is. Traffic between two lossy ranks crosses both lossy
links. Rate caps (tbf) apply to both directions of a rank's link too: on `halo0` (what the rank
sends) and on the bridge port `v<rank>` (what it receives).

MPI: `run` launches `mpiexec -n 1 ip netns exec <ns of rank 0> python -m ... : -n 1 ...` with
MPICH forced onto TCP over `halo0` (no shared memory), so every message crosses the lossy links.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

from . import netns
from .errors import HaloError

PREFIX = "halotb"
HUB = "hub"
BRIDGE = "hbr"
IFACE = "halo0"                 # the rank's interface, the same name in every rank namespace
SUBNET = "198.18.0"             # /24 inside the testbed only (RFC 2544 benchmarking range)
MAX_RANKS = 64
STATE_DIR = os.environ.get("HALO_TESTBED_STATE", "/run/halo-mpi/testbeds")
NAME = re.compile(r"^[a-z0-9]{1,10}$")
MPI_ENV = {                     # MPICH: TCP through libfabric on halo0, no shared memory
    "MPIR_CVAR_NOLOCAL": "1",
    "MPIR_CVAR_CH4_NETMOD": "ofi",
    "FI_PROVIDER": "tcp",
    "FI_TCP_IFACE": IFACE,
}
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


# ---------------------------------------------------------------------------------------------
# the testbed

@dataclass
class Testbed:
    """N ranks, each in its own namespace, on one bridge; `with Testbed(...) as tb:` for scripts."""
    ranks: int
    loss: dict[int, float] = field(default_factory=dict)    # rank -> drop probability, both ways
    rate: dict[int, float] = field(default_factory=dict)    # rank -> Mbit/s cap, both ways
    name: str = ""                                           # short id; random when empty
    persistent: bool = False    # made by `testbed up`: stays until `testbed down`
    owner: list[int] | None = None  # [pid, start time] of the process that removes it at exit
    is_up: bool = False

    def __post_init__(self):
        self.name = self.name or secrets.token_hex(3)
        self.loss = {int(k): float(v) for k, v in (self.loss or {}).items()}
        self.rate = {int(k): float(v) for k, v in (self.rate or {}).items()}
        check_spec(self.ranks, self.loss, self.rate, self.name)
        self._made_by = None          # pid that made it for itself (not persistent), if here

    # names ------------------------------------------------------------------------------------
    @property
    def hub(self) -> str:
        return f"{PREFIX}-{self.name}-{HUB}"

    def namespace(self, rank: int) -> str:
        return f"{PREFIX}-{self.name}-r{rank}"

    def namespaces(self) -> list[str]:
        return [self.namespace(r) for r in range(self.ranks)] + [self.hub]

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    @property
    def state_path(self) -> str:
        return os.path.join(STATE_DIR, f"{self.name}.json")

    # life cycle -------------------------------------------------------------------------------
    def up(self) -> "Testbed":
        """Create the namespaces, links, drop rules and rate caps; on any failure remove them."""
        netns.require_root()
        netns.require_tools()
        taken = HaloError(f"a testbed named {self.name} exists already: choose another --name, "
                          f"or remove it with `halo-mpi testbed down --name {self.name}`")
        if any(n.startswith(f"{PREFIX}-{self.name}-") for n in netns.namespaces()):
            raise taken
        os.makedirs(STATE_DIR, exist_ok=True)
        try:                              # claim the name atomically: two `up`s never share it
            os.close(os.open(self.state_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise taken from None
        if not self.persistent:
            self.owner = process_identity(os.getpid())
            self._made_by = os.getpid()
            atexit.register(self.down)
        self._save()                      # first, so that `down --stale` finds a half-made one
        try:
            with signals_interrupt():
                self._create()
        except BaseException:
            self.down()
            raise
        self.is_up = True
        self._save()
        return self

    def _create(self):
        netns.add_namespace(self.hub)
        netns.add_bridge(self.hub, BRIDGE)
        for rank in range(self.ranks):
            ns = self.namespace(rank)
            netns.add_namespace(ns)
            netns.add_veth(self.hub, BRIDGE, f"v{rank}", ns, IFACE, f"{self.address(rank)}/24")
        self._add_drop_rules()
        for rank, mbit in self.rate.items():
            netns.set_rate(self.namespace(rank), IFACE, mbit)
            netns.set_rate(self.hub, f"v{rank}", mbit)

    def _add_drop_rules(self):
        for lossy, p in sorted(self.loss.items()):
            if p <= 0:
                continue
            netns.add_drop_rule(self.namespace(lossy), IFACE, p, f"to-r{lossy}")
            for other in range(self.ranks):
                if other != lossy:
                    netns.add_drop_rule(self.namespace(other), IFACE, p, f"from-r{lossy}",
                                        source=self.address(lossy))

    def set_loss(self, loss: dict[int, float]):
        """Replace the drop probabilities (e.g. between measurements) without rebuilding."""
        loss = {int(k): float(v) for k, v in loss.items()}
        check_spec(self.ranks, loss, self.rate, self.name)
        for rank in range(self.ranks):
            netns.delete_drop_rules(self.namespace(rank))
        self.loss = loss
        self._add_drop_rules()
        self._save()

    def down(self):
        """Remove everything this testbed made (idempotent; also for a half-made testbed)."""
        if self._made_by not in (None, os.getpid()):
            return                        # a forked child must not remove its parent's testbed
        with shielded():
            leftovers = [n for n in netns.namespaces() if n.startswith(f"{PREFIX}-{self.name}-")]
            for ns in dict.fromkeys(self.namespaces() + leftovers):
                netns.delete_namespace(ns)
            try:
                os.remove(self.state_path)
            except FileNotFoundError:
                pass
            self.is_up = False
            atexit.unregister(self.down)

    def __enter__(self) -> "Testbed":
        if not self.is_up:
            self.up()
        self._signals = signals_interrupt()
        self._signals.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self._signals.__exit__(*exc)
        finally:
            self.down()
        return False

    def _save(self):
        os.makedirs(STATE_DIR, exist_ok=True)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state(), f, indent=1)
        os.replace(tmp, self.state_path)

    def state(self) -> dict:
        s = asdict(self)
        s.update(namespaces=self.namespaces(), iface=IFACE,
                 addresses={r: self.address(r) for r in range(self.ranks)})
        return s

    @classmethod
    def load(cls, name: str) -> "Testbed":
        path = os.path.join(STATE_DIR, f"{name}.json")
        try:
            with open(path) as f:
                s = json.load(f)
        except FileNotFoundError:
            raise HaloError(f"no testbed named {name} (no {path}); start one with "
                            f"`halo-mpi testbed up --name {name} --ranks N ...`") from None
        except json.JSONDecodeError:
            raise HaloError(f"{path} is unreadable (a testbed being made, or a crash while making "
                            f"it): check `ip netns list | grep {PREFIX}-{name}-`, delete those "
                            f"namespaces and the file") from None
        return cls(ranks=s["ranks"], loss=s["loss"], rate=s["rate"], name=s["name"],
                   persistent=s["persistent"], owner=s["owner"], is_up=s["is_up"])

    # running ----------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return {**os.environ, **MPI_ENV}

    def mpiexec_argv(self, argv: list[str], module: str = "halo_mpi.cli",
                     python: str = sys.executable) -> list[str]:
        """mpiexec with one rank per namespace (rank r runs in namespace r), MPMD style."""
        ip = netns.tool("ip")
        cmd = [mpiexec_path()]
        for rank in range(self.ranks):
            if rank:
                cmd.append(":")
            cmd += ["-n", "1", ip, "netns", "exec", self.namespace(rank), python, "-m", module, *argv]
        return cmd

    def kill_ranks(self):
        for rank in range(self.ranks):
            netns.kill_namespace_processes(self.namespace(rank))

    def run(self, argv: list[str], module: str = "halo_mpi.cli", timeout: float | None = None,
            capture: bool = False, down_on_error: bool = True) -> subprocess.CompletedProcess:
        """Run `python -m module argv` on every rank under mpiexec, each in its namespace.

        Returns the finished process (returncode; stdout/stderr when capture). A timeout,
        Ctrl-C or SIGTERM stops mpiexec and every rank, removes the testbed (unless
        down_on_error=False) and raises.
        """
        if not self.is_up:
            raise HaloError(f"testbed {self.name} is not up")
        cmd = self.mpiexec_argv(argv, module)
        pipe = subprocess.PIPE if capture else None
        try:
            with signals_interrupt():
                # its own session: Ctrl-C reaches us only, and we stop the job as a whole
                proc = subprocess.Popen(cmd, env=self.env(), stdin=subprocess.DEVNULL, stdout=pipe,
                                        stderr=pipe, text=True, start_new_session=True)
                try:
                    out, err = proc.communicate(timeout=timeout)
                except BaseException:
                    stop_job(proc)
                    raise
        except subprocess.TimeoutExpired:
            self._after_error(down_on_error)
            raise HaloError(f"testbed {self.name}: `{' '.join(argv)}` did not finish within "
                            f"{timeout:.0f} s; its ranks were stopped") from None
        except BaseException:
            self._after_error(down_on_error)
            raise
        self.kill_ranks()                 # nothing may outlive the run inside the namespaces
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def _after_error(self, down_on_error: bool):
        self.kill_ranks()
        if down_on_error:
            self.down()

    # counters ---------------------------------------------------------------------------------
    def drop_counters(self, by_direction: bool = False) -> dict[int, int] | dict[int, dict[str, int]]:
        """Packets dropped so far on each lossy rank's link: {rank: n} or {rank: {to, from}}."""
        found: dict[int, dict[str, int]] = {r: {"to": 0, "from": 0} for r in self.loss if self.loss[r] > 0}
        for rank in range(self.ranks):
            for label, n in netns.drop_counts(self.namespace(rank)).items():
                direction, lossy = label.split("-r")
                found.setdefault(int(lossy), {"to": 0, "from": 0})[direction] += n
        if by_direction:
            return found
        return {r: d["to"] + d["from"] for r, d in found.items()}


def mpiexec_path() -> str:
    """The mpiexec next to this Python (MPICH from PyPI in the venv), else the one on PATH."""
    import shutil
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    path = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if not path:
        raise HaloError(f"no mpiexec next to {sys.executable} nor on PATH: pip install mpich")
    return path


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


def check_spec(ranks: int, loss: dict[int, float], rate: dict[int, float], name: str):
    if not 2 <= ranks <= MAX_RANKS:
        raise HaloError(f"--ranks {ranks}: a testbed has 2 to {MAX_RANKS} ranks")
    if not NAME.match(name):
        raise HaloError(f"--name {name!r}: use 1 to 10 lower-case letters or digits")
    for option, spec in (("--loss", loss), ("--rate", rate)):
        bad = sorted(r for r in spec if not 0 <= r < ranks)
        if bad:
            raise HaloError(f"{option} names ranks {bad}; this testbed has ranks 0..{ranks - 1}")
    for r, p in loss.items():
        if not 0.0 <= p < 1.0:
            raise HaloError(f"--loss {r}:{p}: a drop probability is in [0, 1)")
    for r, mbit in rate.items():
        if not mbit > 0:
            raise HaloError(f"--rate {r}:{mbit}: a rate is a positive number of Mbit/s")


# ---------------------------------------------------------------------------------------------
# functional API (the benchmark and scripts); `with Testbed(...)` is the same with cleanup

def up(ranks: int, loss: dict[int, float], rate: dict[int, float] | None = None, name: str = "",
       persistent: bool = False) -> Testbed:
    return Testbed(ranks, loss, rate or {}, name, persistent=persistent).up()


def run(testbed: Testbed, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return testbed.run(argv, **kwargs)


def down(testbed: Testbed | str):
    (Testbed.load(testbed) if isinstance(testbed, str) else testbed).down()


def drop_counters(testbed: Testbed) -> dict[int, int]:
    return testbed.drop_counters()


def testbeds() -> list[Testbed]:
    """The testbeds recorded on this machine (up, or half-made by a process that died)."""
    if not os.path.isdir(STATE_DIR):
        return []
    found = []
    for f in sorted(os.listdir(STATE_DIR)):
        if f.endswith(".json"):
            try:
                found.append(Testbed.load(f[:-5]))
            except HaloError as e:
                print(f"halo-mpi testbed: warning: {e}", file=sys.stderr)
    return found


def is_stale(tb: Testbed) -> bool:
    """Made for one run by a process that no longer exists (a run killed with SIGKILL)."""
    return not tb.persistent and (tb.owner is None or process_identity(tb.owner[0]) != tb.owner)


def remove_stale() -> list[str]:
    """Remove stale testbeds and namespaces with our prefix that no state file records."""
    removed = []
    recorded = set()
    for tb in testbeds():
        recorded.add(tb.name)
        if is_stale(tb):
            tb.down()
            removed.append(tb.name)
    for ns in netns.namespaces():
        parts = ns.split("-")
        if len(parts) == 3 and parts[0] == PREFIX and parts[1] not in recorded:
            netns.delete_namespace(ns)
            removed.append(ns)
    return removed


# ---------------------------------------------------------------------------------------------
# measurement: arrival delays of halo-sized messages under loss (issue 4, item 5)

ENGINE_MESSAGE = 576 * 4 + 32   # SmolLM2: one (1, dim) float32 activation plus the 32 B header


def measure_delays(testbed: Testbed | None, sizes_bytes: list[int], loss: float | None, count: int,
                   peer: int = 1, warmup: int = 20, interval_ms: float = 0.0,
                   timeout: float | None = None, rate: float | None = None) -> dict:
    """Ping-pong between rank 0 and `peer` under `loss` on the peer's link, on the testbed.

    With testbed=None a 2-rank testbed is made for the measurement and removed after; with a
    testbed, `loss` (if not None) first replaces the peer's drop probability (set_loss).
    Returns {"loss", "count", "drops": packets dropped during the run, "tcp": TCP's recovery
    counters summed over both ends, "sizes": {str(size): {"forward_ms": [...], "back_ms":
    [...], "rtt_ms": [...]}}}: forward is the arrival delay rank 0 -> peer, back peer -> rank 0,
    rtt the round trip seen by rank 0.
    """
    if testbed is None:
        with Testbed(max(2, peer + 1), {peer: loss or 0.0}, {peer: rate} if rate else {}) as tb:
            return measure_delays(tb, sizes_bytes, None, count, peer, warmup, interval_ms, timeout)
    if loss is not None:
        testbed.set_loss({**testbed.loss, peer: loss})
    import tempfile
    with tempfile.TemporaryDirectory(prefix="halo-delays-") as tmp:
        out = os.path.join(tmp, "delays.json")
        argv = ["--sizes", ",".join(map(str, sizes_bytes)), "--count", str(count), "--peer", str(peer),
                "--warmup", str(warmup), "--interval-ms", str(interval_ms), "--out", out]
        before = testbed.drop_counters().get(peer, 0)
        tcp_before = {r: netns.tcp_counters(testbed.namespace(r)) for r in (0, peer)}
        if timeout is None:   # generous: every message stalled by a doubled RTO, and then some
            timeout = 120 + len(sizes_bytes) * (count + warmup) * (0.05 + 4 * (loss or 0))
        done = testbed.run(argv, module="halo_mpi.pingpong", timeout=timeout, capture=True,
                           down_on_error=False)
        if done.returncode != 0 or not os.path.exists(out):
            raise HaloError(f"ping-pong on testbed {testbed.name} failed (exit {done.returncode}): "
                            f"{(done.stderr or '').strip()[-800:]}")
        with open(out) as f:
            result = json.load(f)
    result["drops"] = testbed.drop_counters().get(peer, 0) - before
    result["tcp"] = {}       # summed over both ends: how TCP recovered (timeouts vs probes ...)
    for r, start in tcp_before.items():
        for k, v in netns.tcp_counters(testbed.namespace(r)).items():
            result["tcp"][k] = result["tcp"].get(k, 0) + v - start.get(k, 0)
    result["loss"] = testbed.loss.get(peer, 0.0)
    return result


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """median, p95, p99, max (and mean, n) of delay samples in ms."""
    xs = sorted(samples_ms)
    if not xs:
        return {"n": 0}

    def pct(q: float) -> float:   # nearest-rank percentile: a real sample, never interpolated
        return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))]

    return {"n": len(xs), "median": statistics.median(xs), "p95": pct(95), "p99": pct(99),
            "max": xs[-1], "mean": statistics.fmean(xs)}


STALL_BINS_MS = (1, 10, 100, 300, 1000)


def stall_histogram(samples_ms: list[float]) -> dict[str, int]:
    """Counts per delay band: <1 ms (no loss), 1-10, 10-100 (fast recovery), 100-300 (one
    RTO), 300-1000 (a doubled RTO), >=1000 ms."""
    edges = (0,) + STALL_BINS_MS + (float("inf"),)
    return {f"{lo:g}-{hi:g}": sum(lo <= x < hi for x in samples_ms) for lo, hi in zip(edges, edges[1:])}


# ---------------------------------------------------------------------------------------------
# CLI: `halo-mpi testbed ...` (cli.py registers add_parser) and `python -m halo_mpi.testbed ...`

def parse_rank_values(spec: str | None, option: str) -> dict[int, float]:
    """'1:0.05,3:0.1' -> {1: 0.05, 3: 0.1}."""
    out: dict[int, float] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        try:
            rank, value = item.split(":")
            out[int(rank)] = float(value)
        except ValueError:
            raise HaloError(f"{option} {spec!r}: write RANK:VALUE,... (e.g. 1:0.05,3:0.05)") from None
    return out


def floats(spec: str, option: str) -> list[float]:
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise HaloError(f"{option} {spec!r} is not a comma list of numbers") from None


def describe(tb: Testbed) -> str:
    loss = ", ".join(f"rank {r}: {p:g}" for r, p in sorted(tb.loss.items()) if p > 0) or "none"
    rate = ", ".join(f"rank {r}: {m:g} Mbit/s" for r, m in sorted(tb.rate.items())) or "none"
    return (f"testbed {tb.name}: {tb.ranks} ranks in namespaces {tb.namespace(0)}.."
            f"{tb.namespace(tb.ranks - 1)} on {SUBNET}.0/24 (interface {IFACE}); "
            f"loss {loss}; rate caps {rate}")


def cmd_up(a):
    tb = up(a.ranks, parse_rank_values(a.loss, "--loss"), parse_rank_values(a.rate, "--rate"),
            a.name or "", persistent=True)
    print(describe(tb))
    print(f"run with:    halo-mpi testbed run --name {tb.name} -- generate --parallel tensor ...")
    print(f"remove with: halo-mpi testbed down --name {tb.name}")


def cmd_run(a):
    netns.require_root()
    argv = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not argv:
        raise HaloError("testbed run needs the halo-mpi command after --, e.g. "
                        "`halo-mpi testbed run --ranks 2 --loss 1:0.05 -- generate --parallel tensor ...`")
    recorded = a.name and os.path.exists(os.path.join(STATE_DIR, f"{a.name}.json"))
    if recorded:
        if a.ranks or a.loss or a.rate:
            raise HaloError(f"testbed {a.name} is up already with its own ranks, loss and rate: "
                            f"drop --ranks/--loss/--rate, or choose another --name")
        tb = Testbed.load(a.name)
        code = tb.run(argv, timeout=a.timeout, down_on_error=not a.keep).returncode
    else:                                  # a testbed for this run alone
        tb = Testbed(a.ranks or 2, parse_rank_values(a.loss, "--loss"),
                     parse_rank_values(a.rate, "--rate"), a.name or "")
        with tb:
            print(describe(tb), file=sys.stderr)
            code = tb.run(argv, timeout=a.timeout).returncode
            if a.drops:
                print(f"dropped packets: {tb.drop_counters(by_direction=True)}", file=sys.stderr)
    if code != 0:
        raise SystemExit(code)


def cmd_down(a):
    netns.require_root()
    if a.stale:
        removed = remove_stale()
        print(f"removed {', '.join(removed)}" if removed else "no stale testbed")
        return
    if not a.name:
        raise HaloError("testbed down needs --name NAME (see `halo-mpi testbed status`) or --stale")
    Testbed.load(a.name).down()
    print(f"removed testbed {a.name}")


def cmd_status(a):
    netns.require_root()
    found = [Testbed.load(a.name)] if a.name else testbeds()
    if not found:
        print("no testbed")
    present = set(netns.namespaces())
    for tb in found:
        missing = [n for n in tb.namespaces() if n not in present]
        state = ("stale (its process is gone: `halo-mpi testbed down --stale`)" if is_stale(tb)
                 else "up" if tb.is_up and not missing else "incomplete")
        print(f"{describe(tb)}; {state}")
        if not missing:
            print(f"  dropped packets: {tb.drop_counters(by_direction=True)}")


def cmd_delays(a):
    netns.require_root()
    losses = floats(a.loss, "--loss")
    sizes = [int(s) for s in floats(a.sizes, "--sizes")]
    rows = []
    # one testbed for all loss rates: its drop rules are replaced between them
    testbed = (nullcontext(Testbed.load(a.name)) if a.name else
               Testbed(max(2, a.peer + 1), {a.peer: 0.0}, {a.peer: a.rate} if a.rate else {}))
    with testbed as tb:
        for p in losses:
            t0 = time.monotonic()
            rows.append(measure_delays(tb, sizes, p, a.count, a.peer, a.warmup, a.interval_ms))
            print(format_delays(rows[-1], time.monotonic() - t0), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f)
        print(f"wrote {a.json}")


def format_delays(r: dict, seconds: float) -> str:
    tcp = " ".join(f"{k}={v}" for k, v in r.get("tcp", {}).items())
    lines = [f"loss {r['loss']:g}: {r['drops']} packets dropped, {seconds:.0f} s; TCP: {tcp}",
             f"  {'size':>6s}   {'delay':7s} {'median':>7s} {'p95':>7s} {'p99':>7s} {'max':>7s} ms"
             f"   n    per band (ms) {' '.join(stall_histogram([]))}"]
    for size, s in r["sizes"].items():
        for key in ("forward_ms", "back_ms", "rtt_ms"):
            q = summarize(s[key])
            bands = " ".join(f"{n:d}" for n in stall_histogram(s[key]).values())
            lines.append(f"  {int(size):6d} B {key[:-3]:7s} {q['median']:7.2f} {q['p95']:7.2f} "
                         f"{q['p99']:7.2f} {q['max']:7.1f}    {q['n']:4d} {bands}")
    return "\n".join(lines)


def add_actions(sub):
    u = sub.add_parser("up", help="create a testbed that stays until `down`",
                       description="Create one network namespace per rank on a private bridge, with "
                                   "random TCP packet drops and rate caps on chosen ranks' links.")
    add_spec_arguments(u)
    u.set_defaults(func=cmd_up)

    r = sub.add_parser("run", help="run a halo-mpi command with one rank per namespace",
                       description="Run `halo-mpi ARGS` under mpiexec, each rank in its namespace, "
                                   "MPICH over TCP on the testbed's links. With --name of a testbed "
                                   "that is up, use it (a Ctrl-C or timeout also removes it, unless "
                                   "--keep); otherwise make a testbed from --ranks/--loss/--rate for "
                                   "this run and remove it at the end, however the run ends.",
                       epilog="example: halo-mpi testbed run --ranks 2 --loss 1:0.05 -- generate "
                              "--parallel tensor --sync strict --prompt Hello --temperature 0")
    add_spec_arguments(r, defaults=False)
    r.add_argument("--timeout", type=float, default=None, help="stop the run after this many seconds")
    r.add_argument("--keep", action="store_true",
                   help="with --name of a testbed that is up: keep it after a Ctrl-C or timeout")
    r.add_argument("--drops", action="store_true",
                   help="print the dropped-packet counters at the end (on stderr)")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- then the halo-mpi arguments")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("down", help="remove a testbed: namespaces, links, rules, qdiscs",
                       description="Remove a testbed and everything it made.")
    d.add_argument("--name", help="the testbed to remove")
    d.add_argument("--stale", action="store_true",
                   help="remove testbeds whose run was killed (their process is gone) and "
                        "unrecorded namespaces named halotb-*")
    d.set_defaults(func=cmd_down)

    s = sub.add_parser("status", help="list testbeds and their drop counters",
                       description="List the testbeds on this machine, their loss and rate, and "
                                   "the packets dropped so far on each lossy link.")
    s.add_argument("--name", help="only this testbed")
    s.set_defaults(func=cmd_status)

    m = sub.add_parser("delays", help="measure message arrival delays under loss (ping-pong)",
                       description="Ping-pong between rank 0 and --peer over the testbed at each "
                                   "loss rate on the peer's link; prints median, p95, p99 and max "
                                   "of the one-way arrival delays (forward: 0 -> peer, back: peer "
                                   "-> 0) and of the round trip, in ms.")
    m.add_argument("--loss", default="0,0.01,0.03,0.05", help="comma list of drop probabilities "
                                                              "(default: %(default)s)")
    m.add_argument("--sizes", default=f"1024,{ENGINE_MESSAGE},8192",
                   help="comma list of message sizes in bytes (default: %(default)s; "
                        f"{ENGINE_MESSAGE} = one SmolLM2 activation + header)")
    m.add_argument("--count", type=int, default=1000, help="timed round trips per size and loss "
                                                           "(default: %(default)s)")
    m.add_argument("--warmup", type=int, default=20, help="untimed round trips first (default: %(default)s)")
    m.add_argument("--interval-ms", type=float, default=0.0,
                   help="pause between round trips, like compute between layers (default: %(default)s)")
    m.add_argument("--peer", type=int, default=1, help="the lossy rank (default: %(default)s)")
    m.add_argument("--rate", type=float, default=None, help="cap the peer's link to this many Mbit/s")
    m.add_argument("--name", help="use this testbed (up already) instead of a 2-rank one made for "
                                  "the measurement; its loss on --peer is replaced")
    m.add_argument("--json", help="write every sample to this JSON file")
    m.set_defaults(func=cmd_delays)


def add_spec_arguments(p, defaults: bool = True):
    p.add_argument("--ranks", type=int, default=2 if defaults else None,
                   help="number of ranks (namespaces)" + (" (default: %(default)s)" if defaults else
                                                          "; default 2"))
    p.add_argument("--loss", metavar="RANK:P,...",
                   help="drop TCP packets to and from RANK at random with probability P "
                        "(e.g. 2:0.05,3:0.05)")
    p.add_argument("--rate", metavar="RANK:MBIT,...",
                   help="cap RANK's link to MBIT Mbit/s in each direction (tbf)")
    p.add_argument("--name", help="short id (letters, digits) in every name; random when omitted")


def add_parser(subparsers):
    """Register `testbed {up,run,down,status,delays}` on halo-mpi's subcommand parsers."""
    t = subparsers.add_parser("testbed", help="real lossy links: namespaces, iptables drops, tbf (root)",
                              description="\n\n".join(__doc__.split("\n\n")[:2]) + "\n\nNeeds root and iptables.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_actions(t.add_subparsers(dest="testbed_action", metavar="ACTION", required=True))
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m halo_mpi.testbed",
                                description=__doc__.split("\n\n")[0] + " Needs root and iptables.")
    add_actions(p.add_subparsers(dest="testbed_action", metavar="ACTION", required=True))
    a = p.parse_args(argv)
    try:
        a.func(a)
    except HaloError as e:
        print(f"halo-mpi testbed: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("halo-mpi testbed: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
