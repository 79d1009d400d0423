"""Low-level Linux networking for the testbed: namespaces, veth pairs, iptables drops, tbf caps.

Thin wrappers over `ip`, `iptables` and `tc` (iproute2 and the Debian package iptables). Each
command runs with a timeout and fails with a HaloError that names the command and its message.
Everything is created inside namespaces given by name: nothing here adds a link, address, rule
or qdisc to the root network namespace, so deleting the namespaces removes all of it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

from ..errors import HaloError

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
COMMAND_TIMEOUT = 20.0      # seconds for one ip/iptables/tc call (they take milliseconds)
INSTALL_IPTABLES = "apt-get update && apt-get install -y iptables"


def tool(name: str) -> str:
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        if name == "iptables":
            raise HaloError(f"iptables is not installed; the testbed drops packets with it: as root "
                            f"run `{INSTALL_IPTABLES}` (Debian package iptables)")
        raise HaloError(f"`{name}` is not installed; the testbed needs it (Debian package iproute2)")
    return path


def require_root(what: str = "halo-mpi testbed"):
    if os.geteuid() != 0:
        raise HaloError(f"{what} needs root (it creates network namespaces and iptables rules): "
                        f"run it as root, e.g. with sudo")


def require_tools():
    """Fail early, with what to install, when ip, tc or iptables is missing."""
    for name in ("ip", "tc", "iptables"):
        tool(name)


def sh(argv: list[str], check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise HaloError(f"`{' '.join(argv)}` did not finish within {timeout:.0f} s") from None
    if check and done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise HaloError(f"`{' '.join(argv)}` failed: {message[-1] if message else f'exit {done.returncode}'}")
    return done


def in_ns(ns: str, argv: list[str]) -> list[str]:
    """argv run inside namespace ns."""
    return [tool("ip"), "netns", "exec", ns, *argv]


# ---------------------------------------------------------------------------------------------
# namespaces

def namespaces() -> list[str]:
    out = sh([tool("ip"), "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add_namespace(ns: str):
    sh([tool("ip"), "netns", "add", ns])
    # IPv4 only: no link-local IPv6 addresses for MPI to pick, no router solicitations on the bridge
    for key in ("all", "default"):
        sh(in_ns(ns, ["sh", "-c", f"echo 1 > /proc/sys/net/ipv6/conf/{key}/disable_ipv6"]), check=False)
    sh([tool("ip"), "-n", ns, "link", "set", "lo", "up"])


def namespace_pids(ns: str) -> list[int]:
    done = sh([tool("ip"), "netns", "pids", ns], check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def kill_namespace_processes(ns: str, grace: float = 2.0):
    """End what still runs inside ns (ranks of a run that was cut short): TERM, then KILL."""
    pids = namespace_pids(ns)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if not pids:
            return


def delete_namespace(ns: str):
    """Delete ns with every link, rule and qdisc in it; a missing ns is not an error."""
    if ns not in namespaces():
        return
    kill_namespace_processes(ns)
    sh([tool("ip"), "netns", "delete", ns])


# ---------------------------------------------------------------------------------------------
# links

def add_bridge(ns: str, bridge: str):
    sh([tool("ip"), "-n", ns, "link", "add", "name", bridge, "type", "bridge"])
    sh([tool("ip"), "-n", ns, "link", "set", bridge, "up"])


def add_veth(hub: str, bridge: str, hub_end: str, ns: str, ns_end: str, address_cidr: str):
    """A veth pair from the bridge in hub to interface ns_end (with an address) inside ns.

    Segmentation offload is turned off on both ends (gso_max_segs 1): a veth hands TCP's
    64 KB offload "super-packets" through whole, so one random drop would lose up to 44
    MTU-sized segments at once. With it off, the drop rule sees real 1500-byte packets.
    """
    ip = tool("ip")
    sh([ip, "-n", hub, "link", "add", hub_end, "type", "veth", "peer", "name", ns_end, "netns", ns])
    sh([ip, "-n", hub, "link", "set", hub_end, "gso_max_segs", "1", "master", bridge, "up"])
    sh([ip, "-n", ns, "link", "set", ns_end, "gso_max_segs", "1"])
    sh([ip, "-n", ns, "addr", "add", address_cidr, "dev", ns_end])
    sh([ip, "-n", ns, "link", "set", ns_end, "up"])


def set_rto_min(ns: str, subnet_cidr: str, iface: str, ms: float):
    """Linux's minimum TCP retransmission timeout (200 ms by default) for this namespace's route to
    the subnet: a per-route setting (`ip route ... rto_min`), so a deployment sets it the same way
    on its devices' routes to each other."""
    sh([tool("ip"), "-n", ns, "route", "replace", subnet_cidr, "dev", iface, "rto_min", f"{ms:g}ms"])


def routes(ns: str) -> list[str]:
    return sh([tool("ip"), "-n", ns, "route", "show"]).stdout.splitlines()


def links(ns: str | None = None) -> list[str]:
    argv = [tool("ip")] + (["-n", ns] if ns else []) + ["-o", "link", "show"]
    return [line.split(":")[1].strip().split("@")[0] for line in sh(argv).stdout.splitlines()]


# ---------------------------------------------------------------------------------------------
# packet drops (iptables statistic) and rate caps (tbf)

DROP_COMMENT = "halo-drop"   # every rule we add carries this comment, plus its label


def add_drop_rule(ns: str, iface: str, probability: float, label: str, source: str | None = None):
    """Drop TCP packets arriving on iface in ns with this probability (from source, if given).

    Drops are made on arrival (INPUT), never on the way out: an OUTPUT drop of a locally sent
    TCP segment is reported to the sender's TCP as a send error, which then retries it without
    any timeout; a packet lost on a wire is never reported, which INPUT reproduces.
    """
    sh(in_ns(ns, [tool("iptables"), "-w", "5", "-A", "INPUT",
                  *drop_rule(iface, probability, label, source)]))


def drop_rule(iface: str, probability: float, label: str, source: str | None = None) -> list[str]:
    """The match and target of a drop rule (what follows `-A INPUT`)."""
    rule = ["-i", iface] + (["-s", source] if source else [])
    return rule + ["-p", "tcp", "-m", "statistic", "--mode", "random", "--probability",
                   f"{probability:.6f}", "-m", "comment", "--comment", f"{DROP_COMMENT} {label}",
                   "-j", "DROP"]


def set_drop_rule(ns: str, iface: str, probability: float, label: str, source: str | None = None):
    """Make the drop rule `label` in ns drop with this probability, 0 removing it. An existing
    rule is replaced in place (`iptables -R`, one commit of the table): from one non-zero
    probability to another there is never a moment with both rules or none."""
    iptables = [tool("iptables"), "-w", "5"]
    found = drop_rules_at(ns, label)
    numbers = sorted(found)
    if probability > 0 and numbers:        # its counters carried over (-c), for drop_counts
        sh(in_ns(ns, [*iptables, "-R", "INPUT", str(numbers[0]), "-c", *found[numbers[0]],
                      *drop_rule(iface, probability, label, source)]))
        numbers = numbers[1:]
    elif probability > 0:
        add_drop_rule(ns, iface, probability, label, source)
    for n in reversed(numbers):             # the highest first: the others keep their numbers
        sh(in_ns(ns, [*iptables, "-D", "INPUT", str(n)]))


def drop_rules_at(ns: str, label: str) -> dict[int, list[str]]:
    """Our drop rules `label` in ns's INPUT: position (1-based, as -R and -D take them) ->
    their counters [packets, bytes]."""
    lines = sh(in_ns(ns, [tool("iptables"), "-w", "5", "-v", "-S", "INPUT"])).stdout.splitlines()
    found = {}
    for i, line in enumerate(line for line in lines if line.startswith("-A INPUT")):
        words = _split_rule(line)
        if f"{DROP_COMMENT} {label}" in words:
            c = words.index("-c") if "-c" in words else None
            found[i + 1] = words[c + 1:c + 3] if c is not None else ["0", "0"]
    return found


def delete_drop_rules(ns: str):
    """Remove the drop rules we added in ns (by their comment); other rules stay."""
    lines = sh(in_ns(ns, [tool("iptables"), "-w", "5", "-S", "INPUT"])).stdout.splitlines()
    for line in lines:
        if DROP_COMMENT in line and line.startswith("-A INPUT"):
            rule = _split_rule(line[len("-A INPUT"):])
            sh(in_ns(ns, [tool("iptables"), "-w", "5", "-D", "INPUT", *rule]))


def _split_rule(text: str) -> list[str]:
    import shlex
    return shlex.split(text)


_COMMENT = re.compile(r"/\* " + DROP_COMMENT + r" (.*?) \*/")


def drop_counts(ns: str) -> dict[str, int]:
    """Packets dropped so far by each of our rules in ns, by label (iptables -L -v -n -x)."""
    out = sh(in_ns(ns, [tool("iptables"), "-w", "5", "-L", "INPUT", "-v", "-n", "-x"])).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        found = _COMMENT.search(line)
        if found and line.split()[0].isdigit():
            counts[found.group(1)] = counts.get(found.group(1), 0) + int(line.split()[0])
    return counts


def iptables_rules(ns: str | None = None) -> list[str]:
    """All rules of the filter table of ns (or of the root namespace), as `iptables -S` prints them."""
    argv = [tool("iptables"), "-w", "5", "-S"]
    return sh(in_ns(ns, argv) if ns else argv).stdout.splitlines()


def set_rate(ns: str, iface: str, mbit: float):
    """Cap what iface sends to mbit Mbit/s with a token bucket (tbf): a slow link.

    The bucket holds at least 4 ms of traffic at the rate (and never less than ten full
    packets), so the kernel's timer granularity does not cut the rate; up to 100 ms of
    traffic may queue behind it before tbf drops.
    """
    bytes_per_s = mbit * 1e6 / 8
    burst = int(max(15000, bytes_per_s * 0.004))
    sh([tool("tc"), "-n", ns, "qdisc", "replace", "dev", iface, "root", "tbf", "rate", f"{mbit}mbit",
        "burst", str(burst), "latency", "100ms"])


def remove_rate(ns: str, iface: str):
    """Lift a cap set by set_rate (none there is not an error)."""
    sh([tool("tc"), "-n", ns, "qdisc", "del", "dev", iface, "root"], check=False)


def qdiscs(ns: str | None = None) -> list[str]:
    argv = [tool("tc")] + (["-n", ns] if ns else []) + ["qdisc", "show"]
    return sh(argv).stdout.splitlines()


# TCP's own account of how it recovered lost packets (per namespace, cumulative)
TCP_COUNTERS = ("OutSegs", "RetransSegs", "TCPTimeouts", "TCPLossProbes", "TCPLossProbeRecovery",
                "TCPFastRetrans", "TCPSackRecovery", "TCPLostRetransmit", "TCPSpuriousRTOs")


def tcp_counters(ns: str) -> dict[str, int]:
    """TCP and TcpExt counters of namespace ns (/proc/net/snmp and /proc/net/netstat)."""
    text = sh(in_ns(ns, ["cat", "/proc/net/snmp", "/proc/net/netstat"])).stdout.splitlines()
    counters: dict[str, int] = {}
    for names, values in zip(text[::2], text[1::2]):     # a line of names, then one of values
        if names.split(":")[0] in ("Tcp", "TcpExt"):
            for k, v in zip(names.split()[1:], values.split()[1:]):
                if k in TCP_COUNTERS:
                    counters[k] = int(v)
    return counters
