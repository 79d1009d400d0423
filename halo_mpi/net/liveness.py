"""Liveness: which peers are heard from, heartbeats, and the silence that ends a run.

Every message from a peer, and a heartbeat (BEAT) its thread sends every `beat_s` while the
process runs, refreshes `heard[peer]`. A peer silent for `rank_timeout` seconds is frozen or dead;
if it is in `fatal` (its silence leaves this rank nothing to wait for: a strict peer, an attention
holder, rank 0 for a worker), waiting raises RankSilent naming it, instead of waiting forever.
Heartbeats stop going to a peer silent for 5 beat periods: a frozen receiver's queue would fill
the sender's shared-memory cells (see tensor/satellites.py, UNANSWERED_LIMIT).

Silence is counted in *listening* time, not wall time: a peer's messages are only seen when this
rank receives (`listen`, at every poll), so time in which it did not (it was computing, loading
its weights, or descheduled on a loaded machine) says nothing of the peer. Between two receives
the listening clock advances by the gap, but by one beat period at most; the rest is this rank's
own stall, counted (`stalls`, `stalled_s`) and never blamed on a peer. Without this a worker busy
loading for 5 beat periods took rank 0 for silent, stopped its heartbeats, and rank 0 then named
that healthy worker (under load, at start).
"""
from __future__ import annotations

import threading
import time

from ..errors import HaloError
from .launch import peer_died, responsive


class RankSilent(HaloError):
    """A peer this rank cannot go on without has been silent for the rank timeout."""
    exit_code = 3       # not bad input (2): the run lost a rank
    def __init__(self, ranks: list[int], timeout: float, where: str = "", died: bool = False):
        self.ranks = ranks
        who = ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
        what = ("died (the launcher reported a process failure)" if died else
                f"silent for {timeout:g} s (--rank-timeout), frozen or dead")
        super().__init__(f"{who} {what}{where}")



class Liveness:
    """The transport's liveness (module docstring): a mixin of Transport, which calls
    `init_liveness` and refreshes `heard` as messages arrive; subclasses send a BEAT in `_beat`."""

    def init_liveness(self, clock=time.perf_counter):
        self.clock = clock                         # wall seconds (a fake one in tests)
        now = clock()
        self.listened = 0.0                        # the listening clock (module docstring)
        self._listened_at = now                    # wall time of the last receive
        self.stalls, self.stalled_s = 0, 0.0       # gaps between receives not counted, and their sum
        self.heard = {r: 0.0 for r in range(self.size) if r != self.rank}  # peer -> listening time heard
        self.rank_timeout: float | None = None     # seconds of silence that make a peer unreachable
        self.fatal: set[int] = set()               # peers whose silence ends the run (RankSilent)
        self.finished: set[int] = set()            # peers done with the run (DONE): no more beats
        self.silence_note = ""                     # said after the ranks in RankSilent's line
        self._checked = now                        # when silences were last checked
        self._beats: threading.Thread | None = None
        self.beat_s = 0.0                          # the heartbeat period (0: no heartbeats)
        self._beating = threading.Event()

    def _beat(self, dest: int): ...

    def listen(self, sources=()):
        """This rank has just received (at every poll, whether or not anything came): the
        listening clock advances by the gap since the last time, a beat period at most (the rest
        is this rank's stall), and `sources` are heard now."""
        now = self.clock()
        gap = now - self._listened_at
        cap = self.beat_s or 1.0
        if gap > cap:
            self.stalls += 1
            self.stalled_s += gap - cap
        self.listened += min(gap, cap)
        self._listened_at = now
        for r in sources:
            self.heard[r] = self.listened

    def silence(self, peer: int) -> float:
        """Listening seconds since `peer` was last heard."""
        return self.listened - self.heard.get(peer, self.listened)

    def watch(self, timeout: float, fatal: set[int], note: str, worker_grace: float = 5.0):
        """Heartbeats and the peers whose silence ends the run: on rank 0 `fatal` (`note` says
        why), silent for `timeout`; on a worker rank 0, silent for timeout + worker_grace, so that
        rank 0, which can name the silent rank, ends the run first."""
        period = min(1.0, timeout / 4)
        if self.rank == 0:
            self.rank_timeout, self.fatal, self.silence_note = timeout, set(fatal), note
            self.start_beats(list(range(1, self.size)), period)
        else:
            self.rank_timeout, self.fatal = timeout + worker_grace, {0}
            self.silence_note = ": rank 0 leads the run; ending"
            self.start_beats([0], period)

    def start_beats(self, to: list[int], period: float):
        """A daemon thread that tells `to` every `period` s that this rank is alive."""
        self.beat_s = period
        def beat():
            while not self._beating.wait(period):
                for r in to:
                    if self.silence(r) < 5 * period and r not in self.finished:   # not to a silent
                        self._beat(r)                                              # or gone peer
        self._beats = threading.Thread(target=beat, name="halo-beats", daemon=True)
        self._beats.start()

    def stop_beats(self):
        if self._beats is not None:
            self._beating.set()
            self._beats.join(timeout=5)
            self._beats = None

    def silent(self, timeout: float | None = None, among=None) -> list[int]:
        """Peers (of `among`, default all) not heard from for `timeout` s (default rank_timeout;
        once the launcher has reported a dead process, 3 heartbeat periods: the dead one)."""
        timeout = self.rank_timeout if timeout is None else timeout
        if timeout is None:
            return []
        if peer_died.is_set() and self.beat_s:
            timeout = min(timeout, 3 * self.beat_s + 0.5)
        return sorted(r for r in (self.heard if among is None else among)
                      if r in self.heard and self.silence(r) > timeout)

    def why_silent(self) -> str:
        """How a silent peer was found, for the line that says so."""
        if peer_died.is_set():
            return "silent since the launcher reported a dead process"
        return f"silent for {self.rank_timeout:g} s"

    def check_fatal(self):
        """RankSilent if a peer this rank cannot do without has been silent too long."""
        responsive()
        if self.rank_timeout is not None and self.fatal:
            gone = self.silent(among=self.fatal)
            if gone:
                raise RankSilent(gone, self.rank_timeout, self.silence_note, died=peer_died.is_set())

