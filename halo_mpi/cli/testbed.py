"""`halo-mpi testbed up|run|set|down|status|delays`: real lossy links on one machine (root).

The testbed itself is halo_mpi/testbed/bed.py; its module docstring explains the layout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext

from ..errors import HaloError
from ..net.ranks import parse_floats, parse_rank_schedule, parse_rank_values
from ..testbed import bed, netns
from ..testbed.bed import IFACE, STATE_DIR, SUBNET, Testbed, is_stale, remove_stale, testbeds
from ..testbed.change import LossSchedule, change_links, run_following, seconds_since, stderr_line
from ..testbed.delays import ENGINE_MESSAGE, measure_delays, stall_histogram, summarize
from .options import non_negative_float, non_negative_int, positive_float, positive_int, rto_min_ms


def describe(tb: Testbed) -> str:
    loss = ", ".join(f"rank {r}: {p:g}" for r, p in sorted(tb.loss.items()) if p > 0) or "none"
    rate = ", ".join(f"rank {r}: {m:g} Mbit/s" for r, m in sorted(tb.rate.items())) or "none"
    rto = f"; TCP rto_min {tb.rto_min_ms:g} ms" if tb.rto_min_ms is not None else ""
    return (f"testbed {tb.name}: {tb.ranks} ranks in namespaces {tb.namespace(0)}.."
            f"{tb.namespace(tb.ranks - 1)} on {SUBNET}.0/24 (interface {IFACE}); "
            f"loss {loss}; rate caps {rate}{rto}")


def cmd_up(a):
    tb = Testbed(a.ranks, parse_rank_values(a.loss, "--loss"), parse_rank_values(a.rate, "--rate"),
                 a.name or "", persistent=True, rto_min_ms=a.rto_min).up()
    print(describe(tb))
    print(f"run with:    halo-mpi testbed run --name {tb.name} -- generate --parallel tensor ...")
    print(f"remove with: halo-mpi testbed down --name {tb.name}")


def cmd_run(a):
    netns.require_root()
    argv = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not argv:
        raise HaloError("testbed run needs the halo-mpi command after --, e.g. "
                        "`halo-mpi testbed run --ranks 2 --loss 1:0.05 -- generate --parallel tensor ...`")
    schedule = LossSchedule.of(parse_rank_schedule(a.loss_schedule, "--loss-schedule", unit="s"))
    recorded = a.name and os.path.exists(os.path.join(STATE_DIR, f"{a.name}.json"))
    if recorded:
        if a.ranks or a.loss or a.rate or a.rto_min is not None:
            raise HaloError(f"testbed {a.name} is up already with its own ranks, loss, rate and "
                            f"rto_min: drop --ranks/--loss/--rate/--rto-min, or choose another --name")
        tb = Testbed.load(a.name)
        code = run_scheduled(tb, argv, schedule, timeout=a.timeout, down_on_error=not a.keep)
    else:                                  # a testbed for this run alone
        tb = Testbed(a.ranks or 2, parse_rank_values(a.loss, "--loss"),
                     parse_rank_values(a.rate, "--rate"), a.name or "", rto_min_ms=a.rto_min)
        with tb:
            print(describe(tb), file=sys.stderr)
            code = run_scheduled(tb, argv, schedule, timeout=a.timeout)
            if a.drops:
                print(f"dropped packets: {tb.drop_counters(by_direction=True)}", file=sys.stderr)
    if code != 0:
        raise SystemExit(code)


def run_scheduled(tb: Testbed, argv: list[str], schedule: LossSchedule, **run_options) -> int:
    """The job's exit status; with a --loss-schedule, its changes applied on time meanwhile."""
    if not schedule.pending:
        return tb.run(argv, **run_options).returncode
    return run_following(tb, argv, schedule, seconds_since(time.monotonic()), log=stderr_line,
                         **run_options).returncode


def cmd_set(a):
    netns.require_root()
    if not a.name:
        raise HaloError("testbed set needs --name NAME of a testbed that is up "
                        "(see `halo-mpi testbed status`)")
    if not (a.loss or a.rate):
        raise HaloError("testbed set needs --loss RANK:P,... and/or --rate RANK:MBIT,... (0: none)")
    tb = Testbed.load(a.name)
    change_links(tb, parse_rank_values(a.loss, "--loss"), parse_rank_values(a.rate, "--rate"))
    print(describe(tb))


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
    losses = parse_floats(a.loss, "--loss")
    sizes = [int(s) for s in parse_floats(a.sizes, "--sizes")]
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

    add_run_action(sub)

    add_set_action(sub)

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

    add_delays_action(sub)


def add_run_action(sub):
    r = sub.add_parser("run", help="run a halo-mpi command with one rank per namespace",
                       description="Run `halo-mpi ARGS` under mpiexec, each rank in its namespace, "
                                   "MPICH over TCP on the testbed's links. With --name of a testbed "
                                   "that is up, use it (a Ctrl-C or timeout also removes it, unless "
                                   "--keep); otherwise make a testbed from --ranks/--loss/--rate for "
                                   "this run and remove it at the end, however the run ends.",
                       epilog="example: halo-mpi testbed run --ranks 2 --loss 1:0.05 -- generate "
                              "--parallel tensor --sync strict --prompt Hello --temperature 0")
    add_spec_arguments(r, defaults=False)
    r.add_argument("--timeout", type=positive_float, default=None,
                   help="stop the run after this many seconds")
    r.add_argument("--keep", action="store_true",
                   help="with --name of a testbed that is up: keep it after a Ctrl-C or timeout")
    r.add_argument("--loss-schedule", metavar="RANK:P@SECONDSs,...",
                   help="change RANK's loss to P that many seconds after the job starts, e.g. "
                        "2:0.1@20s,2:0.3@40s,2:0@60s (the last one stays on a testbed kept up)")
    r.add_argument("--drops", action="store_true",
                   help="print the dropped-packet counters at the end (on stderr)")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- then the halo-mpi arguments")
    r.set_defaults(func=cmd_run)


def add_set_action(sub):
    c = sub.add_parser("set", help="change a rank's loss or rate cap on a testbed that is up, "
                                   "also while a job runs",
                       description="Change the drop probability or the rate cap of ranks' links on "
                                   "a testbed that is up, at once, also while a job runs on it. A "
                                   "rank's drop rules are replaced in place (iptables -R: no moment "
                                   "with both rules or none), one namespace after another. Delay "
                                   "cannot be set: this kernel has no netem, and a fixed delay "
                                   "would need a user-space NFQUEUE program.",
                       epilog="example: halo-mpi testbed set --name demo --loss 2:0.3   "
                              "(then --loss 2:0 to end it)")
    c.add_argument("--name", help="the testbed (see `halo-mpi testbed status`)")
    c.add_argument("--loss", metavar="RANK:P,...",
                   help="drop TCP packets to and from RANK with probability P from now on (0: none)")
    c.add_argument("--rate", metavar="RANK:MBIT,...",
                   help="cap RANK's link to MBIT Mbit/s each way from now on (0: no cap)")
    c.set_defaults(func=cmd_set)


def add_delays_action(sub):
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
    m.add_argument("--count", type=positive_int, default=1000, help="timed round trips per size and loss "
                                                           "(default: %(default)s)")
    m.add_argument("--warmup", type=non_negative_int, default=20,
                   help="untimed round trips first (default: %(default)s)")
    m.add_argument("--interval-ms", type=non_negative_float, default=0.0,
                   help="pause between round trips, like compute between layers (default: %(default)s)")
    m.add_argument("--peer", type=positive_int, default=1, help="the lossy rank (default: %(default)s)")
    m.add_argument("--rate", type=positive_float, default=None,
                   help="cap the peer's link to this many Mbit/s")
    m.add_argument("--name", help="use this testbed (up already) instead of a 2-rank one made for "
                                  "the measurement; its loss on --peer is replaced")
    m.add_argument("--json", help="write every sample to this JSON file")
    m.set_defaults(func=cmd_delays)


def add_spec_arguments(p, defaults: bool = True):
    p.add_argument("--ranks", type=positive_int, default=2 if defaults else None,
                   help="number of ranks (namespaces)" + (" (default: %(default)s)" if defaults else
                                                          "; default 2"))
    p.add_argument("--loss", metavar="RANK:P,...",
                   help="drop TCP packets to and from RANK at random with probability P "
                        "(e.g. 2:0.05,3:0.05)")
    p.add_argument("--rate", metavar="RANK:MBIT,...",
                   help="cap RANK's link to MBIT Mbit/s in each direction (tbf)")
    p.add_argument("--name", help="short id (letters, digits) in every name; random when omitted")
    p.add_argument("--rto-min", type=rto_min_ms, default=None, metavar="MS",
                   help="TCP's minimum retransmission timeout on every rank's route, in ms (Linux's "
                        "default is 200; `ip route ... rto_min`, as a deployment sets it)")


def add_parser(subparsers):
    """Register `testbed {up,run,set,down,status,delays}` on halo-mpi's subcommand parsers."""
    t = subparsers.add_parser("testbed", help="real lossy links: namespaces, iptables drops, tbf (root)",
                              description="\n\n".join(bed.__doc__.split("\n\n")[:2])
                              + "\n\nNeeds root and iptables.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_actions(t.add_subparsers(dest="testbed_action", metavar="ACTION", required=True))
    return t
