"""What losing an attention partial costs: the measurement behind "attention is always waited for".

In HALO sync a late MLP partial is a few groups of one layer's MLP (1/24 of it each for SmolLM2, the
least important ones on an unstable rank), so the scheduler can bound what is lost. An attention
group is one KV head: a third of a layer's attention output for SmolLM2. This ablation runs the
single-process reference with each attention group's output lost with probability p per token and
layer (its K/V still appended, as a late worker does) and reports held-out perplexity, next to
losing MLP groups at the same rate (random ones, not HALO's least important): per group output
lost, attention costs several times more, and there is no unimportant KV head to give to a bad
link (measured figures in the README).

    halo-mpi bench --attention-drop 0.01,0.05 --eval-tokens 256
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..model.evaluate import perplexity, teacher_forced_nll
from ..model.generate import LocalSession
from ..model.llama import Transformer


class LossyAttention:
    """A block's attention whose KV-head groups each lose their output with probability p."""

    def __init__(self, attention, p: float, rng: np.random.Generator):
        self.a, self.p, self.rng = attention, p, rng
        self.n_kv, self.nbytes, self.lost = attention.n_kv, attention.nbytes, 0

    def __call__(self, x, k_cache, v_cache, pos, cos, sin):
        a, T = self.a, x.shape[0]
        q = a.append(x, k_cache, v_cache, pos, cos, sin)                       # (nh, T, hd)
        S = pos + T
        mask = torch.ones(T, S, dtype=torch.bool).tril(pos) if T > 1 else None
        out = F.scaled_dot_product_attention(q[None], k_cache[None, :, :S], v_cache[None, :, :S],
                                             attn_mask=mask, enable_gqa=True)[0]  # (nh, T, hd)
        keep = torch.from_numpy((self.rng.random(a.n_kv) >= self.p).astype(np.float32))
        self.lost += int(a.n_kv - keep.sum())
        out = out.view(a.n_kv, -1, T, out.shape[-1]) * keep[:, None, None, None]  # (n_kv, n_rep, T, hd)
        return a.o(out.view(a.n_heads, T, -1).transpose(0, 1).reshape(T, -1))


class LossyMLP:
    """A block's MLP whose neuron groups each lose their output with probability p."""

    def __init__(self, mlp, p: float, rng: np.random.Generator):
        self.m, self.p, self.rng, self.nbytes, self.lost = mlp, p, rng, mlp.nbytes, 0

    def __call__(self, x):
        keep = self.rng.random(len(self.m.ids)) >= self.p
        self.lost += int((~keep).sum())
        return self.m.subset(x, keep) if not keep.all() else self.m(x)


def attention_drop(store, ids: list[int], rates: list[float], seed: int = 0, progress=None) -> list[dict]:
    """Perplexity over `ids` with attention groups, then MLP groups, lost at each rate."""
    rows = []
    for part in ("attention", "mlp"):
        for p in rates:
            rng = np.random.default_rng(seed)
            model = Transformer.from_store(store)
            for b in model.blocks.values():
                if part == "attention":
                    b.attention = LossyAttention(b.attention, p, rng)
                else:
                    b.feed_forward = LossyMLP(b.feed_forward, p, rng)
            with torch.inference_mode():
                ppl = perplexity(teacher_forced_nll(LocalSession(model, len(ids)), ids))
            lost = sum((b.attention if part == "attention" else b.feed_forward).lost
                       for b in model.blocks.values())
            rows.append({"part": part, "rate": p, "perplexity": ppl, "groups_lost": lost})
            if progress:
                progress(rows[-1])
    return rows
