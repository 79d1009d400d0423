"""Tensor-parallel HALO mode: rank 0 coordinates, every rank computes a share of each layer.

    mpiexec -n 4 halo-mpi generate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05 \\
        --prompt "The capital of France is" --temperature 0

Rank 0 holds the residual stream, the norms and sampling; every rank (rank 0 too) holds a share
of each layer's attention groups (KV heads with their caches), of its MLP neuron groups, and a
vocabulary slice of the output head. Per layer, rank 0 sends the normalized hidden state to the
ranks holding attention groups of that layer, computes its own, and gathers every attention
partial; then the same for the MLP, where it gathers all partials (strict sync), or the critical
ones plus whatever else arrives before each link's deadline (HALO sync). After the last layer it
gathers every logits slice. The embedding rows are read from the store token by token. (Strict
sync with exact partials runs as an all-reduce instead, tensor/exchange.py: rank 0 only announces
each step's tokens and gathers the logits.)

Attention partials and logits are never dropped: an attention group's partial is a third of the
layer's attention output for SmolLM2 (one MLP group is a 24th of an MLP, and HALO drops only the
least important ones), losing attention outputs costs several times more perplexity per group
than losing MLP groups (`halo-mpi bench --attention-drop`), and the logits decide the token. So
in HALO sync attention groups and head slices sit only on rank 0 and the stable ranks
(`placement.holders`); a re-plan that finds a holder unstable moves its attention groups to the
others with their K/V caches, relayed through rank 0.

A missing MLP partial counts as zero, unless rank 0 holds a backup of those groups
(--backup-share: the most important share of each unstable rank's groups, by calibration), which
it then computes itself; a late partial is discarded when it arrives. A link whose missed
partial is still not there a round-trip bound later is treated as stalled (real TCP delivers in
order: what follows a lost segment waits for it) and not waited for until something arrives from
it again; that rule lives in `gather.DeadlineGather`. The model itself does not know any of this:
`DistributedAttention`, `DistributedMLP` and `DistributedHead` replace its parts from outside.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import HaloError
from ..model.groups import GroupMLP
from ..net.framing import Kind, json_payload
from ..net.links import LinkEstimate
from ..net.transport import Transport
from ..stats import RssTrace
from .attention import HeldAttention, attention_moves, relay_caches
from .gather import DeadlineGather, GatherResult, LayerKey
from .placement import Placement, attention_placement, held_by, holders, vocab_slices
from .policy import SyncPolicy


@dataclass
class StepRecord:
    step: int
    decoding: bool
    dropped_share: float = 0.0                             # mean over layers of dropped importance
    skipped_share: float = 0.0                             # mean over layers skipped by --sparsity
    dropped_ranks: Counter = field(default_factory=Counter)  # rank -> layers dropped


LoadGroups = Callable[[int, np.ndarray], "GroupMLP | None"]   # (layer, ids) -> the groups' MLP

# MPICH's shared-memory path sends from a pool of 64 cells per process (MPIR_CVAR_CH4_SHM_POSIX_
# IQUEUE_NUM_CELLS) and a cell comes back only when its receiver reads it. A worker that stops
# receiving (frozen: SIGSTOP, a stalled SD card) keeps every cell sent to it, and once rank 0's
# pool is empty its messages to *every* rank wait: one frozen unstable rank stalled HALO for the
# whole freeze (a 5 s SIGSTOP cost a 4.9 s token at -n 3). So rank 0 keeps at most this many MLP
# inputs unanswered on one rank; past it the rank's partials count as missing until it answers.
UNANSWERED_LIMIT = 24


# ---------------------------------------------------------------------------------------------
# rank 0

class Coordinator:
    """Per layer: send x, compute own groups, gather partials under the sync policy.

    importance: static (n_layers, G) shares; predictor: per-token importance (optional);
    sparsity: share of the predicted least important groups skipped outright in decode steps;
    replanner: moves groups when links change (optional). Partials carry the plan version in
    the header's plan field, so one computed under an old placement is never added in.
    clock: what the deadline gather and the layer's send time are measured with (tests fake it).
    attention: placement[layer][rank] -> KV heads, with `held` rank 0's own groups and caches;
    vocab: rank -> [start, stop) of the head, `load_head(start, stop)` reads a slice. Without
    them the model keeps its own attention and head (an MLP-only coordinator, for tests).
    """

    def __init__(self, transport: Transport, placement: Placement, importance: np.ndarray,
                 policy: SyncPolicy, load_groups: LoadGroups, predictor=None, sparsity: float = 0.0,
                 replanner=None, log=None, clock: Callable[[], float] = time.perf_counter,
                 probes: frozenset = frozenset(), attention: Placement | None = None,
                 held: HeldAttention | None = None, vocab: list | None = None, load_head=None,
                 exchange=None, loading=None, load_copies: LoadGroups | None = None):
        self.t, self.importance, self.policy = transport, importance, policy
        # under --mem-budget: rank 0's BudgetedWeights (load_groups builds through it), and
        # prefill copies of unstable ranks' groups are read per use with load_copies, not kept
        self.loading = loading
        self.load_copies = load_copies or load_groups
        self.exchange = exchange    # strict sync as an all-reduce (tensor/exchange.py), or None
        self.announced = -1         # the last step whose tokens the workers were told
        self.attention_placement, self.held = attention, held
        self.vocab, self.load_head = vocab, load_head
        self.head_slice = load_head(*vocab[0]) if vocab and vocab[0][1] > vocab[0][0] else None
        self.pos = 0                                         # the sequence's length (for re-plans)
        self.model_bytes = 0                                 # the model's own weights here (norms)
        self.deadlines = DeadlineGather(transport, policy, range(1, transport.size), clock,
                                        n_layers=len(placement))
        self.backup: dict[int, dict[int, GroupMLP]] = {}          # layer -> rank -> its backed-up groups
        self.prefill_copies: dict[tuple[int, int], GroupMLP] = {}  # (layer, unstable rank) -> its groups
        self.unanswered = Counter()                          # rank -> MLP inputs sent since it last answered
        self.silent: list[int] = []                          # workers that did not answer STOP
        self.unreachable: dict[int, int] = {}                # rank -> step it was found silent
        self.rss = RssTrace(every=50)                        # resident MB every 50 steps
        self.probes = set(probes)   # ranks whose groups only probe their link: all backed up
        self.stuck_share: dict[int, float] = {}   # late ranks with nowhere to move: share backed up
        self.load_groups, self.predictor, self.sparsity = load_groups, predictor, sparsity
        self.replanner, self.log = replanner, log or (lambda line: None)
        self.n_layers = len(placement)
        self.version = 0
        self.placement: Placement = []
        self.own: dict[int, GroupMLP | None] = {}
        self.set_placement(placement)
        self.step, self.decoding = 0, False
        self.records: list[StepRecord] = []
        self.sent_at = 0.0                                   # when the current layer's inputs went out
        self.late_discarded = Counter()                      # rank -> stale partials thrown away
        self.used = Counter()                                # rank -> partials added in
        self.recovered = Counter()                           # rank -> missing partials made up by backup
        self.compute_s = self.gather_wait_s = 0.0
        self.replans: list[str] = []

    @property
    def links(self) -> dict[int, LinkEstimate]:
        """rank -> its link's estimate (owned by the deadline gather; the replanner reads it)."""
        return self.deadlines.links

    def set_placement(self, placement: Placement):
        changed = [l for l in range(self.n_layers)
                   if not self.placement or not np.array_equal(self.placement[l][0], placement[l][0])]
        self.placement = placement
        self.prefill_copies.clear()                          # (read again where still needed)
        for l in changed:
            self.own[l] = self.load_groups(l, placement[l][0]) if len(placement[l][0]) else None
        self.set_backup()

    def set_backup(self):
        """Rank 0's copies of the most important `backup_share` of each unstable rank's groups
        (by static importance), and of every group of a probe rank, reloaded only where they
        change."""
        if self.policy.mode != "halo" or (self.policy.backup_share <= 0 and not self.probes
                                          and not self.stuck_share):
            self.backup = {}
            return
        for l, placed in enumerate(self.placement):
            old, new = self.backup.get(l, {}), {}
            for r in sorted(self.policy.unstable | self.probes | set(self.stuck_share)):
                if r >= len(placed) or not len(placed[r]):
                    continue
                share = (1.0 if r in self.probes else
                         max(self.policy.backup_share, self.stuck_share.get(r, 0.0)))
                n = int(np.ceil(share * len(placed[r]) - 1e-9))
                ids = np.sort(placed[r][np.argsort(-self.importance[l][placed[r]], kind="stable")[:n]])
                if r in old and np.array_equal(old[r].ids, ids):
                    new[r] = old[r]
                elif len(ids):
                    new[r] = self.load_groups(l, ids)
            self.backup[l] = new

    # -- steps
    def begin_step(self, decoding: bool):
        self.step += 1
        self.decoding = decoding
        self.records.append(StepRecord(self.step, decoding))
        self.rss.tick()
        self.watch_silence()
        if decoding and self.replanner is not None:
            self.maybe_replan()

    def watch_silence(self):
        """A worker silent for the rank timeout (frozen or dead) is unreachable: said once, its MLP
        groups re-placed on the others (their stores hold every group) where the re-planner has
        room; otherwise its partials keep counting as missing. A rank whose silence is fatal (an
        attention or head holder, any rank in strict sync) ends the run in the transport instead.
        Should it answer again, the next plan reaches it and its link earns its groups back."""
        if self.t.rank_timeout is None:
            return
        for r in self.t.silent():
            if r in self.unreachable or r in self.t.fatal:
                continue
            self.unreachable[r] = self.step
            line = f"rank {r} {self.t.why_silent()} at step {self.step}: unreachable"
            if self.replanner is None:
                line += "; its partials count as missing (re-planning is off)"
                self.replans.append(line)
                self.log(line)
                continue
            new, why = self.replanner.exclude(r, self.placement)
            line += f"; {why}"
            if new is None:
                self.replans.append(line)
                self.log(line)
            else:
                self.apply_plan(new, line)

    def maybe_replan(self):
        stuck_before = set(self.replanner.said_stuck)
        new, line = self.replanner.update(self.links, self.placement, self.step)
        if new is not None:
            self.apply_plan(new, line)
        elif line:                      # re-rated with nothing to move: said once, in the summary
            line += self.back_up_stuck(self.replanner.said_stuck - stuck_before)
            self.replans.append(line)
            self.log(line)

    def back_up_stuck(self, ranks: set[int]) -> str:
        """What is left when a late rank's groups have nowhere to go (two ranks): rank 0 backs
        them up, as many as its memory budget (the device profile's memory_mb) has room for, the
        most important first, and recomputes them when that rank's partial misses its deadline.
        Not in strict sync (it waits anyway) nor under --mem-budget (copies outside the budget)."""
        if not ranks:
            return ""
        if self.policy.mode != "halo" or self.loading is not None:
            return "; its late partials count as missing"
        limit = self.replanner.cluster.ranks[0].memory_mb * 1e6
        room = limit - self.weight_bytes - self.model_bytes
        said = []
        for r in sorted(ranks):
            if r in self.probes:
                said.append(f"rank 0 backs up all of rank {r}'s groups already (they probe its link)")
                continue
            held = sum(len(p[r]) for p in self.placement)
            need = held * self.replanner.group_mb * 1e6
            share = 1.0 if need <= room else max(0.0, room / need) if need else 0.0
            if share <= 0:
                said.append(f"rank 0 has no room to back up rank {r}'s groups: its late partials "
                            f"count as missing")
                continue
            self.stuck_share[r] = share
            room -= share * need
            said.append(f"rank 0 now backs up {share:.0%} of rank {r}'s {held} groups "
                        f"({share * need / 1e6:.1f} MB) and computes them when its partials are late")
        self.set_backup()
        return "; " + "; ".join(said) if said else ""

    def apply_plan(self, new: Placement, line: str):
        """Tell every worker its new groups, load rank 0's, move attention groups with caches."""
        self.version += 1
        attention, vocab = self.attention_placement, self.vocab
        if attention is not None:   # a holder turned unstable: its attention and head slice move
            eligible = holders(self.replanner.cluster, self.policy.mode)
            attention = attention_placement(self.replanner.cluster, self.n_layers, self.held.args.n_kv_heads,
                                            eligible, previous=self.attention_placement)
            vocab = vocab_slices(self.replanner.cluster, self.held.args.vocab_size, eligible, self.vocab)
        moves = self.attention_moves(attention)
        for r in range(1, self.t.size):
            body = {"mlp": [p[r].tolist() for p in new], "pos": self.pos,
                    "attention": None if attention is None else [p[r].tolist() for p in attention],
                    "vocab": None if vocab is None else list(vocab[r])}
            self.t.send(r, Kind.PLAN, self.step, -1, json_payload(body), plan=self.version)
        self.policy.unstable = frozenset(self.replanner.unstable())
        self.probes = self.replanner.probes()
        # a rank that recovered needs no stuck backup (set_backup re-reads the rest by the new plan)
        self.stuck_share = {r: s for r, s in self.stuck_share.items() if r in self.policy.unstable}
        self.set_placement(new)
        if attention is not None:
            moved_mb = self.move_caches(moves, attention)
            if vocab != self.vocab:
                self.vocab = vocab
                self.head_slice = self.load_head(*vocab[0]) if vocab[0][1] > vocab[0][0] else None
            if moves:
                line += f"; attention groups moved with their caches: {len(moves)} ({moved_mb:.2f} MB of K/V)"
            if self.t.rank_timeout is not None and self.policy.mode == "halo":   # holders may change
                self.t.fatal = held_by(attention, vocab, self.t.size)
        self.replans.append(line)
        self.log(line)

    def attention_moves(self, new: Placement | None) -> list[tuple[int, int, int, int]]:
        n_kv = self.held.args.n_kv_heads
        return [] if new is None else attention_moves(self.attention_placement, new, n_kv)

    def move_caches(self, moves: list, attention: Placement) -> float:
        """Every moved group's K/V to its new rank (through rank 0); returns the MB moved."""
        caches = relay_caches(self.t, self.held, moves, self.pos, self.step, self.version,
                              on_other=lambda m: self.late_discarded.update([m.source]))
        for l in {l for l, *_ in moves}:
            self.held.regroup(l, attention[l][0], {h: caches[(l, h)] for ll, h, _, dst in moves
                                                   if ll == l and dst == 0})
        self.attention_placement = attention
        return sum(c.nbytes for c in caches.values()) / 1e6

    # -- attention and head: every partial is waited for
    def announce(self, tokens: torch.Tensor, pos: int, last_only: bool):
        """All-reduce mode: tell every worker the step's tokens, so that it runs the step too."""
        if self.exchange is None:
            return
        self.exchange.step = self.announced = self.step
        ids = tokens.numpy().astype(np.int32).reshape(-1, 1)             # (T, 1)
        for r in range(1, self.t.size):
            self.t.send(r, Kind.STEP, self.step, int(last_only), ids, pos=pos)

    def own_compute(self, compute):
        t0 = time.perf_counter()
        out = compute()
        self.compute_s += time.perf_counter() - t0
        return out

    def attention(self, layer: int, x: torch.Tensor, pos: int) -> torch.Tensor:
        """The layer's attention output for x (T, dim) at positions pos..: rank 0's own groups plus
        every other holder's partial."""
        self.pos = pos + x.shape[0]
        if self.exchange is not None:
            if self.announced != self.step:
                raise HaloError("all-reduce mode: run each step through TensorParallelSession.step, "
                                "which tells the workers its tokens")
            held = layer in self.held.layers
            own = self.own_compute(lambda: self.held.step(layer, x, pos)) if held else None
            return self.exchange.allreduce(Kind.ATTN_PARTIAL, layer, own, x)
        placed = self.attention_placement[layer]
        peers = [r for r in range(1, len(placed)) if len(placed[r])]
        payload = x.numpy()                                   # (T, dim)
        for r in peers:
            self.t.send(r, Kind.ATTN_INPUT, self.step, layer, payload, plan=self.version, pos=pos)
        t0 = time.perf_counter()
        out = self.held.step(layer, x, pos) if layer in self.held.layers else torch.zeros_like(x)
        self.compute_s += time.perf_counter() - t0
        for _rank, part in sorted(self.gather_all(Kind.ATTN_PARTIAL, layer, peers).items()):
            out += torch.from_numpy(part)
        return out

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (T, vocab): every rank's vocabulary slice, gathered strictly."""
        peers = [r for r in range(1, len(self.vocab)) if self.vocab[r][1] > self.vocab[r][0]]
        payload = x.numpy()                                   # (T, dim)
        if self.exchange is None:     # (in the all-reduce, workers compute their slices unasked)
            for r in peers:
                self.t.send(r, Kind.HEAD_INPUT, self.step, self.n_layers, payload, plan=self.version)
        parts = {0: self.own_compute(lambda: self.head_slice(x))} if self.head_slice is not None else {}
        got = (self.exchange.collect(Kind.LOGITS, self.n_layers, peers) if self.exchange is not None
               else self.gather_all(Kind.LOGITS, self.n_layers, peers))
        parts.update((r, torch.from_numpy(p)) for r, p in got.items())
        return torch.cat([parts[r] for r in sorted(parts, key=lambda r: self.vocab[r][0])], dim=-1)

    def gather_all(self, kind: Kind, layer: int, peers: list[int]) -> dict[int, np.ndarray]:
        """Every peer's reply of `kind` for this step and layer, however late."""
        key = LayerKey(self.step, layer, self.version, kind)
        shares = dict.fromkeys([0] + peers, 0.0)     # (unused: every peer is critical here)
        got, result = self.deadlines.gather(key, peers, self.deadlines.clock(), shares, decoding=False)
        for r in set(got) | set(result.discarded):
            self.unanswered[r] = 0
        self.late_discarded.update(result.discarded)
        self.gather_wait_s += result.wait_s
        return got

    @property
    def weight_bytes(self) -> int:
        """Rank 0's resident weights here: its MLP groups, backups, attention groups, head slice."""
        n = sum(m.nbytes for m in self.own.values() if m is not None)
        n += sum(m.nbytes for b in self.backup.values() for m in b.values())
        n += sum(m.nbytes for m in self.prefill_copies.values())
        n += self.held.nbytes if self.held is not None else 0
        n += self.loading.buffer_bytes if self.loading is not None else 0
        return n + (self.head_slice.nbytes if self.head_slice is not None else 0)

    # -- one layer of MLP
    def group_importance(self, layer: int, x: torch.Tensor) -> np.ndarray:
        """(G,) shares of this layer's importance for the current token(s). Strict sync drops
        nothing and, without sparsity, needs no per-token prediction: calibration's shares do."""
        strict = self.policy.mode == "strict" and self.sparsity == 0
        if self.predictor is None or not self.decoding or strict:
            return self.importance[layer]
        g = self.predictor(layer, x).sum(0).numpy()
        return g / g.sum()

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.exchange is not None:
            own = self.own.get(layer)
            part = self.own_compute(lambda: own(x)) if own is not None else None
            return self.exchange.allreduce(Kind.PARTIAL, layer, part, x)
        imp = self.group_importance(layer, x)
        keep = None
        if self.sparsity > 0:             # contextual sparsity: skip the least important groups
            keep = np.ones(len(imp), bool)
            if self.decoding:              # (prefill computes all: the prompt's KV cache lasts)
                keep[np.argsort(-imp)[max(1, round((1 - self.sparsity) * len(imp))):]] = False
            self.records[-1].skipped_share += float(imp[~keep].sum()) / self.n_layers
        placed = self.placement[layer]
        local_keep = {r: (keep[placed[r]] if keep is not None else None) for r in range(len(placed))}
        shares = {r: float(imp[placed[r]][local_keep[r]].sum() if keep is not None else imp[placed[r]].sum())
                  for r in range(len(placed))}
        peers = [r for r in range(1, len(placed)) if len(placed[r])
                 and (keep is None or local_keep[r].any())]
        # HALO prefill waits for every partial (the prompt's KV cache lasts), so an unstable link
        # that stalls would hold the whole prompt: rank 0 computes those ranks' groups itself
        here = [r for r in peers if not self.decoding and self.policy.mode == "halo"
                and r in self.policy.unstable and keep is None]
        peers = [r for r in peers if r not in here]
        payload = x.numpy()                                   # (T, dim)
        for r in peers:
            if self.unanswered[r] >= UNANSWERED_LIMIT:   # not receiving (frozen?): see the constant
                continue                                  # (still a peer: its partial counts as missing)
            body = payload if keep is None else with_mask_row(payload, local_keep[r])
            self.t.send(r, Kind.INPUT, self.step, layer, body, plan=self.version)
            self.unanswered[r] += 1
        sent_at = self.sent_at = self.deadlines.clock()   # the gather's clock: round trips count from here
        t0 = time.perf_counter()
        own = self.own.get(layer)
        if own is None or (keep is not None and not local_keep[0].any()):
            out = torch.zeros_like(x)
        else:
            out = own(x) if keep is None else own.subset(x, local_keep[0])
        for r in here:
            out += self.prefill_copy(layer, r)(x)
        self.compute_s += time.perf_counter() - t0
        backup = self.backup.get(layer)
        backed = {r: self.backed_up(backup[r], imp, keep) for r in peers if r in backup} if backup else {}
        lost = {r: shares[r] - (backed[r][1] if r in backed else 0.0) for r in peers} if backed else None
        covered = frozenset(r for r in backed if lost[r] <= 1e-9) if backed else frozenset()
        got = self.gather(layer, peers, sent_at, shares, lost, covered)
        for _rank, part in sorted(got.items()):   # in rank order: the same float sum whatever arrived first
            out += torch.from_numpy(part)
        t0 = time.perf_counter()
        for r, (mask, _) in backed.items():   # missing partials that rank 0 can make up for
            if r not in got and (mask is None or mask.any()):
                out += backup[r](x) if mask is None else backup[r].subset(x, mask)
                self.recovered[r] += 1
        self.compute_s += time.perf_counter() - t0
        return out

    def prefill_copy(self, layer: int, rank: int) -> GroupMLP:
        """Rank 0's copy of an unstable rank's groups for prefill: its backup when that is all of
        them, else read from the store once (the drop budget keeps an unstable rank's share
        small: 3 of 24 groups of SmolLM2 at -n 2)."""
        ids = self.placement[layer][rank]
        backup = self.backup.get(layer, {}).get(rank)
        if backup is not None and np.array_equal(backup.ids, ids):
            return backup
        copy = self.prefill_copies.get((layer, rank))
        if copy is None or not np.array_equal(copy.ids, ids):
            copy = self.load_copies(layer, ids)
            if self.loading is None:         # under a budget: read again for each prefill chunk
                self.prefill_copies[(layer, rank)] = copy
        return copy

    @staticmethod
    def backed_up(mlp: GroupMLP, imp: np.ndarray, keep) -> tuple:
        """(mask over the backup's groups or None for all, importance share they cover)."""
        mask = None if keep is None else keep[mlp.ids]
        ids = mlp.ids if mask is None else mlp.ids[mask]
        return mask, float(imp[ids].sum())

    def gather(self, layer: int, peers: list[int], sent_at: float, shares: dict,
               lost: dict | None = None, covered: frozenset = frozenset()) -> dict[int, np.ndarray]:
        """Partials of `peers` under the deadline rule of `DeadlineGather`, with the layer's outcome
        counted in. `lost`: the importance a missing partial costs (its share less what rank 0
        backs up); without it, the whole share."""
        key = LayerKey(self.step, layer, self.version)
        got, result = self.deadlines.gather(key, peers, sent_at, shares, self.decoding, covered)
        for r in set(got) | set(result.discarded):        # it receives and answers again
            self.unanswered[r] = 0
        self.used.update(got.keys())
        self.late_discarded.update(result.discarded)
        self.account(result, lost or {r: shares[r] for r in peers})
        self.gather_wait_s += result.wait_s
        return got

    def account(self, result: GatherResult, lost: dict[int, float]):
        """The step's record: which ranks' partials were dropped, and the importance that cost."""
        rec = self.records[-1]
        for r in result.dropped:
            rec.dropped_ranks[r] += 1
            rec.dropped_share += lost[r] / self.n_layers

    # -- the end
    def finish(self, timeout: float = 20.0) -> dict[int, dict]:
        """STOP every worker and collect its statistics; late partials are drained meanwhile. A
        worker that does not answer within `timeout` (frozen, gone) is listed in `silent`: the
        caller reports what it has and ends the job, never waits for it."""
        if self.loading is not None:
            self.loading.close()
        self.t.pump(flush=True)   # held inputs go first: a worker must see them before its STOP
        for r in range(1, self.t.size):
            self.t.send(r, Kind.STOP, self.step + 1, -1, np.zeros((0, 1), np.float32))
        done: dict[int, dict] = {}
        end = time.perf_counter() + timeout
        while True:
            waiting = set(range(1, self.t.size)) - set(done) - set(self.t.silent())   # (unreachable:
            if not waiting or time.perf_counter() > end:                              #  not waited for)
                self.silent = sorted(set(range(1, self.t.size)) - set(done))
                break
            for m in self.t.poll(1.0):
                if m.kind == Kind.DONE:
                    done[m.source] = m.json()
                else:
                    self.late_discarded[m.source] += 1
        return done


def with_mask_row(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """x (T, dim) plus one last row whose first len(keep) entries flag the groups to compute."""
    mask = np.zeros((1, x.shape[1]), np.float32)
    mask[0, :len(keep)] = keep
    return np.concatenate([x, mask])


class DistributedMLP:
    """Stands in for a block's MLP on rank 0: (T, dim) -> (T, dim) summed over all ranks' groups."""
    nbytes = 0    # the weights are counted where they are held (Coordinator.weight_bytes)

    def __init__(self, coordinator: Coordinator, layer: int):
        self.coordinator, self.layer = coordinator, layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.coordinator.mlp(self.layer, x)


class DistributedAttention:
    """Stands in for a block's attention on rank 0. The K/V caches live with the groups on their
    ranks (rank 0's in `Coordinator.held`), so the model's own cache for it is empty."""
    n_kv = 0
    nbytes = 0

    def __init__(self, coordinator: Coordinator, layer: int):
        self.coordinator, self.layer = coordinator, layer

    def __call__(self, x, k_cache, v_cache, pos: int, cos, sin) -> torch.Tensor:
        return self.coordinator.attention(self.layer, x, pos)


class DistributedHead:
    """Stands in for the output head on rank 0: (T, dim) -> (T, vocab) from every rank's slice."""
    nbytes = 0

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.coordinator.head(x)


class TensorParallelSession:
    """The generate() session of rank 0: the model with its distributed parts, one sequence."""

    def __init__(self, model, coordinator: Coordinator, max_len: int, prefill_chunk: int):
        self.model, self.coordinator, self.chunk = model, coordinator, prefill_chunk
        self.cache = model.new_cache(max_len)

    def prefill(self, ids: list[int]) -> torch.Tensor:
        for start in range(0, len(ids), self.chunk):
            logits = self.step(torch.tensor(ids[start:start + self.chunk]), decoding=False)
        return logits[0]

    def decode(self, token: int) -> torch.Tensor:
        return self.step(torch.tensor([token]), decoding=True)[0]

    def step(self, tokens: torch.Tensor, decoding: bool, last_only: bool = True) -> torch.Tensor:
        """Logits of tokens (T,) appended to the sequence: (1, vocab), or (T, vocab)."""
        self.coordinator.begin_step(decoding)
        self.coordinator.announce(tokens, self.cache.pos, last_only)
        return self.model(tokens, self.cache, last_only=last_only)

    def close(self):
        """(The groups' K/V caches are reused by the next sequence, from position 0.)"""
