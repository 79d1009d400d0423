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
    """Picks each token from the logits (rank 0). Penalties count the tokens it picked itself;
    with top_logprobs set, every pick is recorded in `picks` with the model's log-probabilities
    (before temperature, penalties and bias)."""
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0         # nucleus: keep the smallest set of tokens holding this probability
    seed: int = 0              # -2**63 .. 2**64-1 (torch's range)
    presence_penalty: float = 0.0    # subtracted once from a token already picked (OpenAI's)
    frequency_penalty: float = 0.0   # subtracted per earlier pick of the token
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    top_logprobs: int | None = None  # None: nothing recorded; k: the pick and the k likeliest
    picks: list = field(default_factory=list)   # (token, logprob, [(id, logprob), ...]) per pick

    def __post_init__(self):
        self.rng = torch.Generator().manual_seed(self.seed)
        self.counts: dict[int, int] = {}     # token -> times picked

    def __call__(self, logits: torch.Tensor) -> int:
        token = self._pick(self._adjusted(logits))
        if self.top_logprobs is not None:
            self._record(logits, token)
        self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.double()
        if self.logit_bias:
            ids, bias = torch.tensor(list(self.logit_bias)), list(self.logit_bias.values())
            logits = logits.index_add(0, ids, torch.tensor(bias, dtype=logits.dtype))
        if self.counts and (self.presence_penalty or self.frequency_penalty):
            ids = torch.tensor(list(self.counts))
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype)
            logits = logits.index_add(0, ids, -(counts * self.frequency_penalty + self.presence_penalty))
        return logits

    def _pick(self, logits: torch.Tensor) -> int:
        if self.temperature <= 0:
            return int(torch.argmax(logits))
        # shifted so the largest is 0: a tiny temperature gives 0 and -inf, never inf - inf
        probs = torch.softmax((logits - logits.max()) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < self.top_p
            keep[0] = True                                    # top_p 0 keeps the top token
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.rng))

    def _record(self, logits: torch.Tensor, token: int):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, self.top_logprobs) if self.top_logprobs else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        self.picks.append((token, float(logprobs[token]), alternatives))


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)   # generated ids, stop token excluded
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)  # one entry per decode step
    stopped_by: str = "max-new-tokens"    # or "end-of-sequence token", "stop", "cancelled", "error"
    error: str | None = None                 # what failed in this sequence alone (stopped by "error")

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


def pick_token(sampler: Sampler, logits: torch.Tensor, stop_ids, on_token,
               result: GenerationResult) -> str | None:
    """One token sampled and handed on (appended to result.tokens); what ends the sequence, or
    None. A fault in sampling or in on_token (rank 0 alone, between two steps, so every rank
    stays in step) ends this sequence with its error, not the run."""
    try:
        token = sampler(logits)
        if token in stop_ids:
            return "end-of-sequence token"
        result.tokens.append(token)
        if on_token and on_token(token):
            return "stop"
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
        return "error"
    return None


def generate(session, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
             stop_ids=frozenset(), on_token=None) -> GenerationResult:
    """Prefill the prompt, then sample up to max_new_tokens, calling on_token(id) for each; a
    true answer from on_token ends the generation there (stopped by "stop": a stop string, a
    client gone); a fault in sampling ends it with its error (stopped by "error")."""
    result = GenerationResult(prompt_tokens=len(prompt_ids))
    t0 = time.perf_counter()
    logits = session.prefill(prompt_ids)
    result.prefill_s = time.perf_counter() - t0
    for i in range(max_new_tokens):
        verdict = pick_token(sampler, logits, stop_ids, on_token, result)
        if verdict is not None:
            result.stopped_by = verdict
            break
        token = result.tokens[-1]
        if i == max_new_tokens - 1:
            break
        t0 = time.perf_counter()
        logits = session.decode(token)
        result.decode_s.append(time.perf_counter() - t0)
    return result
