"""Sampling and the generation loop, written against a `Session` so every mode shares them.

A session holds one sequence's state and turns tokens into next-token logits:
    session.prefill(ids: list[int]) -> (vocab,) logits after the last prompt token
    session.decode(token: int)      -> (vocab,) logits after that token
    session.close()                 -> the sequence's state released
`LocalSession` is the single-process one (the reference model); tensor mode's
TensorParallelSession and the pipeline's RingSession provide the same calls.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from .llama import Transformer


class LocalSession:
    """One sequence on the single-process reference model."""

    def __init__(self, model: Transformer, max_len: int):
        self.model, self.cache = model, model.new_cache(max_len)

    def prefill(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor(ids), self.cache, last_only=True)[0]

    def decode(self, token: int) -> torch.Tensor:
        return self.model(torch.tensor([token]), self.cache, last_only=True)[0]

    def close(self):
        self.cache = None


@dataclass
class Sampler:
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0         # nucleus: keep the smallest set of tokens holding this probability
    seed: int = 0

    def __post_init__(self):
        self.rng = torch.Generator().manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.double() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < self.top_p   # always keeps the top token
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.rng))


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)   # generated ids, stop token excluded
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)  # one entry per decode step
    stopped_by: str = "max-new-tokens"

    @property
    def ms_per_token_median(self) -> float:
        return 1e3 * statistics.median(self.decode_s) if self.decode_s else float("nan")

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.decode_s)
        return len(self.decode_s) / total if total else float("nan")

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "tokens": self.tokens,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "ms_per_token_median": self.ms_per_token_median, "tokens_per_s": self.tokens_per_s,
                "stopped_by": self.stopped_by}

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens, prefill {self.prefill_s * 1e3:.0f} ms "
                f"({self.prompt_tokens / max(self.prefill_s, 1e-9):.0f} tok/s); generated "
                f"{len(self.tokens)} tokens: {self.ms_per_token_median:.1f} ms/token (median), "
                f"{self.tokens_per_s:.1f} tokens/s; stopped by {self.stopped_by}")


def generate(session, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
             stop_ids=frozenset(), on_token=None) -> GenerationResult:
    """Prefill the prompt, then sample up to max_new_tokens, calling on_token(id) for each; a
    true answer from on_token ends the generation there (stopped by "stop": a stop string, a
    client gone)."""
    result = GenerationResult(prompt_tokens=len(prompt_ids))
    t0 = time.perf_counter()
    logits = session.prefill(prompt_ids)
    result.prefill_s = time.perf_counter() - t0
    for i in range(max_new_tokens):
        token = sampler(logits)
        if token in stop_ids:
            result.stopped_by = "end-of-sequence token"
            break
        result.tokens.append(token)
        if on_token and on_token(token):
            result.stopped_by = "stop"
            break
        if i == max_new_tokens - 1:
            break
        t0 = time.perf_counter()
        logits = session.decode(token)
        result.decode_s.append(time.perf_counter() - t0)
    return result
