"""Rank 0's side of the satellites (unstable ranks): a layer's MLP input out to them, their
partials in under the deadline rule, what rank 0 makes up for the ones that miss, and the record
of what each step dropped.

    peers = satellites.to_ask(layer, placed, keep)        # which satellites count for this layer
    satellites.send(layer, x, peers, placed, keep)       # before rank 0 computes its own partial
    own += satellites.fold(layer, x, peers, ...)         # after: the partials in time, backups

Whatever folds in here becomes part of rank 0's contribution to the members' all-reduce, so every
stable member adds the same set. A missing partial counts as zero unless rank 0 holds a backup of
those groups (--backup-share, probes, ranks stuck with nowhere to move), which it then computes
itself; a late partial is discarded when it arrives. In HALO prefill (the prompt's K/V lasts)
rank 0 computes the satellites' groups itself: a stalled link would hold the whole prompt.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.groups import GroupMLP
from ..net.framing import Kind
from ..net.transport import Transport
from .gather import DeadlineGather, LayerKey
from .held import HeldGroups, LoadGroups
from .policy import SyncPolicy

# MPICH's shared-memory path sends from a pool of 64 cells per process (MPIR_CVAR_CH4_SHM_POSIX_
# IQUEUE_NUM_CELLS) and a cell comes back only when its receiver reads it. A satellite that stops
# receiving (frozen: SIGSTOP, a stalled SD card) keeps every cell sent to it, and once rank 0's
# pool is empty its messages to *every* rank wait: one frozen unstable rank stalled HALO for the
# whole freeze (a 5 s SIGSTOP cost a 4.9 s token at -n 3). So rank 0 keeps at most this many MLP
# inputs unanswered on one rank; past it the rank's partials count as missing until it answers.
UNANSWERED_LIMIT = 24
# A probe rank (a link so late that it keeps one group, which rank 0 computes as its own too) is
# asked on one layer in this many, the layers taking turns with the step (layer + step): enough to
# keep measuring its link (3 answers a token for SmolLM2), without the round's bookkeeping on the
# other layers. By the layer alone, a probe whose groups lie in other layers was never asked again.
PROBE_EVERY = 10
# A probe whose last this many partials came on time in a row looks recovered: it is asked on
# every layer, so that the record a promotion needs (roles.py: 512 partials and more) comes within
# tens of tokens rather than hundreds (rank 0 waits for no probe: this costs its link only)
PROBATION = 64


@dataclass
class StepRecord:
    step: int
    decoding: bool
    dropped_share: float = 0.0                             # mean over layers of dropped importance
    skipped_share: float = 0.0                             # mean over layers skipped by --sparsity
    dropped_ranks: Counter = field(default_factory=Counter)  # rank -> layers dropped
    dropped_by_rank: Counter = field(default_factory=Counter)  # rank -> its part of dropped_share


class Satellites:
    """Rank 0's dealings with the satellites (module docstring). inbox: what the deadline gather
    reads (the transport, with the members' messages taken out: lead.py's LeadInbox)."""

    def __init__(self, transport: Transport, inbox, ranks: list[int], policy: SyncPolicy, n_layers: int,
                 load_copies: LoadGroups, backups: HeldGroups, clock=time.perf_counter, keep_copies=True):
        self.t, self.ranks, self.policy, self.n_layers = transport, sorted(ranks), policy, n_layers
        self.deadlines = DeadlineGather(inbox, policy, self.ranks, clock)
        self.load_copies, self.keep_copies = load_copies, keep_copies   # not kept under a budget
        self.backups = backups                               # (layer, rank) -> rank 0's copy
        self.prefill_copies: dict[tuple[int, int], GroupMLP] = {}
        self.unanswered = Counter()                          # rank -> inputs sent since it last answered
        self.records: list[StepRecord] = []
        self.used, self.late_discarded, self.recovered = Counter(), Counter(), Counter()
        self.unsent = Counter()                              # rank -> inputs held back (unanswered)
        self.wait_s = self.compute_s = 0.0

    @property
    def links(self):
        return self.deadlines.links

    def discard_late(self, replies: list):
        """Partials of closed steps, set aside meanwhile: discarded, a probe's judged."""
        for m in replies:
            self.late_discarded[m.source] += 1
            self.deadlines.judge_late(m)
        self.deadlines.expire()

    def add(self, rank: int):
        """A satellite from now on (a member demoted: planner.py)."""
        self.ranks = sorted(set(self.ranks) | {rank})
        self.deadlines.add(rank)

    def remove(self, rank: int):
        """A member from now on (a satellite promoted): no more inputs; late partials discarded."""
        self.ranks = [r for r in self.ranks if r != rank]
        self.deadlines.remove(rank)

    def begin_step(self, step: int, decoding: bool):
        self.step, self.decoding = step, decoding
        self.records.append(StepRecord(step, decoding))

    def holding(self, layer: int, placed: list[np.ndarray], keep: np.ndarray | None) -> list[int]:
        """The satellites holding groups of `layer` that are computed (not all skipped)."""
        return [r for r in self.ranks if len(placed[r]) and (keep is None or keep[placed[r]].any())]

    def to_ask(self, layer: int, placed: list[np.ndarray], keep: np.ndarray | None,
               probes=frozenset()) -> list[int]:
        """The satellites whose partials of `layer` count: those holding groups of it (HALO prefill
        asks none; a probe rank, one layer in PROBE_EVERY, taking turns with the step, or every
        layer once its record looks recovered: PROBATION)."""
        if not self.decoding and self.policy.mode == "halo" and keep is None:
            return []            # prefill: rank 0 computes their groups itself (module docstring)
        turn = (layer + self.step) % PROBE_EVERY == 0
        return [r for r in self.holding(layer, placed, keep)
                if turn or r not in probes or self.on_probation(r)]

    def on_probation(self, rank: int) -> bool:
        link = self.links.get(rank)
        return link is not None and link.streak >= PROBATION

    def send(self, layer: int, x: torch.Tensor, peers: list[int], placed: list[np.ndarray],
             keep: np.ndarray | None, version: int):
        """x (T, dim) to each satellite in `peers` (with keep, a last row flags the groups it
        computes)."""
        payload = x.numpy()                                                   # (T, dim)
        for r in peers:
            if self.unanswered[r] >= UNANSWERED_LIMIT:    # not receiving (frozen?): see the constant
                self.unsent[r] += 1                        # (still a peer: its partial counts as missing)
                continue
            body = payload if keep is None else with_mask_row(payload, keep[placed[r]])
            self.t.send(r, Kind.INPUT, self.step, layer, body, plan=version)
            self.unanswered[r] += 1
        self.sent_at = self.deadlines.clock()

    def fold(self, layer: int, x: torch.Tensor, peers: list[int], placed: list[np.ndarray],
             imp: np.ndarray, keep: np.ndarray | None, members_share: float, version: int,
             probes=frozenset()) -> torch.Tensor | None:
        """The satellites' part of `layer` (T, dim), or None when they hold nothing of it: the
        partials that came in time, and what rank 0 computes for the rest (backups, prefill).
        A probe's partial only measures its link: rank 0 computes its groups as its own."""
        if not self.decoding and self.policy.mode == "halo" and keep is None:
            return self._prefill(layer, x, placed, probes)
        if not peers:
            return None
        shares = {r: 0.0 if r in probes else float(imp[placed[r]][keep[placed[r]]].sum() if keep is not None
                                                    else imp[placed[r]].sum()) for r in peers}
        backed = {r: self._backed(layer, r, imp, keep) for r in peers if (layer, r) in self.backups.mlps}
        lost = {r: shares[r] - (backed[r][1] if r in backed else 0.0) for r in peers}
        covered = frozenset(r for r in peers if lost[r] <= 1e-9)
        got = self._gather(LayerKey(self.step, layer, version), peers, {0: members_share, **shares}, covered)
        for r in probes & set(got):
            del got[r]                               # (measured; its groups are rank 0's own)
        self._account(lost)
        out = torch.zeros_like(x)
        for _rank, part in sorted(got.items()):    # in rank order: the same float sum whatever came first
            out += torch.from_numpy(part)
        t0 = time.perf_counter()
        for r, (mask, _) in backed.items():        # missing partials that rank 0 can make up for
            if r not in got and (mask is None or mask.any()):
                copy = self.backups.mlps[(layer, r)]
                out += copy(x) if mask is None else copy.subset(x, mask)
                self.recovered[r] += 1
        self.compute_s += time.perf_counter() - t0
        return out

    def _gather(self, key: LayerKey, peers: list[int], shares: dict, covered: frozenset) -> dict:
        got, result = self.deadlines.gather(key, peers, self.sent_at, shares, self.decoding, covered)
        for r in set(got) | set(result.discarded):        # it receives and answers again
            self.unanswered[r] = 0
        self.used.update(got.keys())
        self.late_discarded.update(result.discarded)
        self.wait_s += result.wait_s
        self._dropped = result.dropped
        return got

    def _account(self, lost: dict[int, float]):
        """The step's record: which satellites' partials were dropped, and the importance lost."""
        rec = self.records[-1]
        for r in self._dropped:
            rec.dropped_ranks[r] += 1
            rec.dropped_share += lost[r] / self.n_layers
            rec.dropped_by_rank[r] += lost[r] / self.n_layers

    def _backed(self, layer: int, rank: int, imp: np.ndarray, keep) -> tuple:
        """(mask over the backup's groups or None for all, importance share they cover)."""
        ids = self.backups.mlps[(layer, rank)].ids
        mask = None if keep is None else keep[ids]
        return mask, float(imp[ids if mask is None else ids[mask]].sum())

    def _prefill(self, layer: int, x: torch.Tensor, placed: list[np.ndarray], probes) -> torch.Tensor | None:
        """Rank 0 computes the satellites' groups of `layer` itself: from its backup when that is
        all of them, else from a copy read from the store once (the drop budget keeps a
        satellite's share small: 3 of 24 groups of SmolLM2 at -n 2)."""
        out = None
        t0 = time.perf_counter()
        for r in self.ranks:
            ids = placed[r]
            if not len(ids) or r in probes:          # (a probe's groups are rank 0's own)
                continue
            backup = self.backups.mlps.get((layer, r))
            whole = backup is not None and np.array_equal(backup.ids, ids)
            copy = backup if whole else self._copy(layer, r, ids)
            out = copy(x) if out is None else out + copy(x)
        self.compute_s += time.perf_counter() - t0
        return out

    def _copy(self, layer: int, rank: int, ids: np.ndarray) -> GroupMLP:
        copy = self.prefill_copies.get((layer, rank))
        if copy is None or not np.array_equal(copy.ids, ids):
            copy = self.load_copies(layer, ids)
            if self.keep_copies:         # under a budget: read again for each prefill chunk
                self.prefill_copies[(layer, rank)] = copy
        return copy

    @property
    def nbytes(self) -> int:
        """Rank 0's copies of satellites' groups: backups and prefill copies."""
        return self.backups.nbytes + sum(m.nbytes for m in self.prefill_copies.values())


def with_mask_row(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """x (T, dim) plus one last row whose first len(keep) entries flag the groups to compute."""
    mask = np.zeros((1, x.shape[1]), np.float32)
    mask[0, :len(keep)] = keep
    return np.concatenate([x, mask])
