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

import atexit
import json
import os
import re
import secrets
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from ..errors import HaloError
from ..net.launch import mpiexec_path
from . import netns
from .launch import process_identity, run_job, shielded, signals_interrupt

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


# ---------------------------------------------------------------------------------------------
# the testbed

@dataclass
class Testbed:
    """N ranks, each in its own namespace, on one bridge; `with Testbed(...) as tb:` for scripts."""
    ranks: int
    loss: dict[int, float] = field(default_factory=dict)    # rank -> drop probability, both ways
    rate: dict[int, float] = field(default_factory=dict)    # rank -> Mbit/s cap, both ways
    name: str = ""                                           # short id; random when empty
    rto_min_ms: float | None = None   # TCP's minimum retransmission timeout on every rank's route
    persistent: bool = False    # made by `testbed up`: stays until `testbed down`
    owner: list[int] | None = None  # [pid, start time] of the process that removes it at exit
    is_up: bool = False

    def __post_init__(self):
        self.name = self.name or secrets.token_hex(3)
        self.loss = {int(k): float(v) for k, v in (self.loss or {}).items()}
        self.rate = {int(k): float(v) for k, v in (self.rate or {}).items()}
        check_spec(self.ranks, self.loss, self.rate, self.name, self.rto_min_ms)
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
        return state_file(self.name)

    # life cycle -------------------------------------------------------------------------------
    def up(self) -> Testbed:
        """Create the namespaces, links, drop rules and rate caps; on any failure remove them."""
        netns.require_root()
        netns.require_tools()
        taken = HaloError(f"a testbed named {self.name} exists already: choose another --name, "
                          f"or remove it with `halo-mpi testbed down --name {self.name}`")
        if any(n.startswith(f"{PREFIX}-{self.name}-") for n in netns.namespaces()):
            raise taken
        if not claim_state(self.name):      # atomically: two `up`s never share a name
            raise taken
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
        if self.rto_min_ms is not None:
            for rank in range(self.ranks):
                netns.set_rto_min(self.namespace(rank), f"{SUBNET}.0/24", IFACE, self.rto_min_ms)
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
            remove_state(self.name)
            self.is_up = False
            atexit.unregister(self.down)

    def __enter__(self) -> Testbed:
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
        save_state(self.name, self.state())

    def state(self) -> dict:
        s = asdict(self)
        s.update(namespaces=self.namespaces(), iface=IFACE,
                 addresses={r: self.address(r) for r in range(self.ranks)})
        return s

    @classmethod
    def load(cls, name: str) -> Testbed:
        s = read_state(name)
        return cls(ranks=s["ranks"], loss=s["loss"], rate=s["rate"], name=s["name"],
                   persistent=s["persistent"], owner=s["owner"], is_up=s["is_up"],
                   rto_min_ms=s.get("rto_min_ms"))

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
        try:
            done = run_job(self.mpiexec_argv(argv, module), self.env(), timeout, capture)
        except subprocess.TimeoutExpired:
            self._after_error(down_on_error)
            raise HaloError(f"testbed {self.name}: `{' '.join(argv)}` did not finish within "
                            f"{timeout:.0f} s; its ranks were stopped") from None
        except BaseException:
            self._after_error(down_on_error)
            raise
        self.kill_ranks()                 # nothing may outlive the run inside the namespaces
        return done

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


def check_spec(ranks: int, loss: dict[int, float], rate: dict[int, float], name: str,
               rto_min_ms: float | None = None):
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
    if rto_min_ms is not None and not 0 < rto_min_ms <= 200:
        raise HaloError(f"--rto-min {rto_min_ms:g}: give milliseconds in (0, 200] "
                        f"(Linux's default minimum is 200 ms)")


# ---------------------------------------------------------------------------------------------
# state files: STATE_DIR/<name>.json records each testbed of this machine for later commands
# (`testbed run --name`, `down`, `status`) and for the sweep of stale ones

def state_file(name: str) -> str:
    return os.path.join(STATE_DIR, f"{name}.json")


def claim_state(name: str) -> bool:
    """Create the state file of testbed `name`, atomically; False if it exists."""
    os.makedirs(STATE_DIR, exist_ok=True)
    try:
        os.close(os.open(state_file(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def save_state(name: str, state: dict):
    """Replace the state file whole (a reader never sees half of it)."""
    os.makedirs(STATE_DIR, exist_ok=True)
    path = state_file(name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)


def read_state(name: str) -> dict:
    path = state_file(name)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise HaloError(f"no testbed named {name} (no {path}); start one with "
                        f"`halo-mpi testbed up --name {name} --ranks N ...`") from None
    except json.JSONDecodeError:
        raise HaloError(f"{path} is unreadable (a testbed being made, or a crash while making "
                        f"it): check `ip netns list | grep {PREFIX}-{name}-`, delete those "
                        f"namespaces and the file") from None


def remove_state(name: str):
    try:
        os.remove(state_file(name))
    except FileNotFoundError:
        pass


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
