"""Teacher-forced perplexity through any session (the reference, or the tensor-parallel engine
under the same sync and loss as generation): every position is a decode step, so dropped
partials cost what they cost in generation.

    halo-mpi evaluate --tokens 128                                   # single process
    mpiexec -n 4 halo-mpi evaluate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05
    mpiexec -n 2 halo-mpi evaluate --parallel tensor --sequences 4   # 4 parts of the text, batched
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


def batched_nll(batch, parts: list[list[int]]) -> list[float]:
    """teacher_forced_nll of several sequences decoded together (model/batch.py's BatchModel):
    each step feeds every unfinished part its true previous token, one row each (a decode step,
    as in generation); the parts' values in order."""
    states = [batch.open(len(p)) for p in parts]
    nll: list[list[float]] = [[] for _ in parts]
    live = [i for i, p in enumerate(parts) if len(p) > 1]
    logits = batch.step([(states[i], parts[i][:1]) for i in live])          # (B, vocab)
    t = 1
    while live:
        for i, row in zip(live, logits):
            nll[i].append(-float(torch.log_softmax(row.double(), -1)[parts[i][t]]))
        live = [i for i in live if t + 1 < len(parts[i])]
        if live:
            logits = batch.step([(states[i], [parts[i][t]]) for i in live])
        t += 1
    for state in states:
        batch.close(state)
    return [v for values in nll for v in values]


def split_text(ids: list[int], sequences: int) -> list[list[int]]:
    """ids as `sequences` consecutive parts of (nearly) equal length."""
    n = len(ids)
    return [ids[n * k // sequences:n * (k + 1) // sequences] for k in range(sequences)]


def perplexity(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))
