"""Sync policies: which partials rank 0 waits for without a deadline.

- strict: every partial (the blocking-allreduce baseline); the output equals the reference.
- halo: the partials of stable ranks, then those of unstable ranks in order of importance until
  `critical_share` of the layer's importance is covered; the rest only until their deadline.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SyncPolicy:
    mode: str = "halo"                 # strict | halo
    critical_share: float = 0.3        # halo: wait until this share of importance has arrived
    unstable: frozenset = frozenset()  # ranks whose partials may be dropped
    deadline_factor: float = 1.5
    deadline_margin: float = 0.002     # seconds
    initial_deadline: float = 0.100    # seconds, before a link has samples
    backup_share: float = 0.0          # halo: rank 0 also holds this top share of each unstable
                                       # rank's groups and computes them when a partial is missing

    def critical(self, own_share: float, shares: dict[int, float]) -> set[int]:
        """Peers to wait for without deadline: all (strict); stable ones, then unstable ones by
        importance until the critical share is covered (halo)."""
        if self.mode == "strict":
            return set(shares)
        chosen = {r for r in shares if r not in self.unstable}
        covered = own_share + sum(shares[r] for r in chosen)
        for r in sorted(set(shares) - chosen, key=lambda r: -shares[r]):
            if covered >= self.critical_share - 1e-9:
                break
            chosen.add(r)
            covered += shares[r]
        return chosen
