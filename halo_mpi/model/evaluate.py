"""Teacher-forced perplexity through any session (the reference, or the tensor-parallel engine
under the same sync and loss as generation): every position is a decode step, so dropped
partials cost what they cost in generation.

    halo-mpi evaluate --tokens 128                                   # single process
    mpiexec -n 4 halo-mpi evaluate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05
"""
from __future__ import annotations

import math

import torch


def teacher_forced_nll(session, ids: list[int]) -> list[float]:
    """Negative log-likelihood of ids[1:], feeding the true previous token at every step."""
    nll = []
    logits = session.prefill(ids[:1])
    for nxt in ids[1:]:
        nll.append(-float(torch.log_softmax(logits.double(), -1)[nxt]))
        if len(nll) < len(ids) - 1:
            logits = session.decode(nxt)
    return nll


def perplexity(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))
