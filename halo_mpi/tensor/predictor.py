"""The semantic-aware importance predictor: one low-rank model per layer, run before the MLP.

    importance_l(x) = exp((x @ A_l) @ B_l + b_l)      x (T, dim) -> (T, G) predicted group norms

A_l (dim, r), B_l (r, G): with r = 32 all 30 layers of SmolLM2-135M cost ~0.4% of the model's
FLOPs. It regresses the log contribution norm of each group on calibration text, from the
layer's MLP input (`current`) or from the previous layer's MLP input (`ahead`: known one layer
early, so loading can start before the layer runs). The fit is reduced-rank ridge regression in
closed form: the ridge solution W (dim, G), projected on the top-r right singular vectors of the
fitted values, which is the rank-r least-squares optimum (Izenman 1975) and takes milliseconds
per layer. Stored in the store under /calibration/predictor_{current,ahead}_{A,B,b}.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..model.llama import Transformer

EPS = 1e-6


@dataclass
class Predictor:
    A: torch.Tensor   # (L, dim, r)
    B: torch.Tensor   # (L, r, G)
    b: torch.Tensor   # (L, G)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(T, dim) -> (T, G) predicted contribution norms (positive)."""
        return torch.exp(torch.matmul(torch.matmul(x, self.A[layer]), self.B[layer]) + self.b[layer])

    @property
    def rank(self) -> int:
        return self.A.shape[-1]

    def flops_per_token(self) -> int:
        L, dim, r = self.A.shape
        return 2 * L * (dim * r + r * self.B.shape[-1])

    def arrays(self, kind: str) -> dict[str, np.ndarray]:
        return {f"predictor_{kind}_A": self.A.numpy(), f"predictor_{kind}_B": self.B.numpy(),
                f"predictor_{kind}_b": self.b.numpy()}

    @classmethod
    def from_store(cls, store, kind: str = "current") -> Predictor | None:
        parts = [store.calibration(f"predictor_{kind}_{p}") for p in "ABb"]
        if any(p is None for p in parts):
            return None
        return cls(*(torch.from_numpy(p) for p in parts))


def model_flops_per_token(model_args) -> int:
    a = model_args
    attn = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads)
    return 2 * (a.n_layers * (attn + 3 * a.dim * a.hidden_dim) + a.vocab_size * a.dim)


def collect(model: Transformer, ids: list[int], chunk: int = 256, progress: bool = True):
    """MLP inputs (T, dim) and per-group contribution norms (T, G) of every layer over ids."""
    xs: dict[int, list] = {l: [] for l in model.blocks}
    ys: dict[int, list] = {l: [] for l in model.blocks}
    originals = {l: b.feed_forward for l, b in model.blocks.items()}

    def recording(layer, mlp):
        def forward(x):
            xs[layer].append(x.clone())
            ys[layer].append(mlp.per_group(x).norm(dim=-1))        # (T, G, dim) -> (T, G)
            return mlp(x)
        return forward

    try:
        for l, b in model.blocks.items():
            b.feed_forward = recording(l, originals[l])
        cache = model.new_cache(len(ids))
        with torch.inference_mode():
            for start in tqdm(range(0, len(ids), chunk), desc="collect", unit="chunk", disable=not progress):
                model(torch.tensor(ids[start:start + chunk]), cache, last_only=True)
    finally:
        for l, b in model.blocks.items():
            b.feed_forward = originals[l]
    return ({l: torch.cat(v) for l, v in xs.items()}, {l: torch.cat(v) for l, v in ys.items()})


def fit_layer(x: torch.Tensor, y: torch.Tensor, rank: int, ridge: float = 1e-2):
    """Reduced-rank ridge regression of log(y) on x: returns A (dim, r), B (r, G), b (G,)."""
    x, target = x.double(), torch.log(y.double() + EPS)
    x_mean, t_mean = x.mean(0), target.mean(0)
    xc, tc = x - x_mean, target - t_mean
    gram = xc.T @ xc
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    W = torch.linalg.solve(gram, xc.T @ tc)                  # (dim, G) full-rank ridge fit
    _, _, vh = torch.linalg.svd(xc @ W, full_matrices=False)  # right singular vectors of the fit
    V = vh[:rank].T                                          # (G, r)
    A, B = W @ V, V.T                                        # (dim, r), (r, G)
    b = t_mean - x_mean @ A @ B
    return A.float(), B.float(), b.float()


def train(xs: dict, ys: dict, rank: int = 32, ahead: bool = False, progress: bool = True) -> Predictor:
    """One predictor per layer; `ahead` predicts layer l from layer l-1's MLP input."""
    layers = sorted(xs)
    parts = []
    for i, l in enumerate(tqdm(layers, desc="fit predictors" + (" (ahead)" if ahead else ""),
                               unit="layer", disable=not progress)):
        source = xs[layers[max(0, i - 1)]] if ahead else xs[l]
        parts.append(fit_layer(source, ys[l], min(rank, ys[l].shape[1])))
    return Predictor(*(torch.stack(p) for p in zip(*parts)))


# ---------------------------------------------------------------------------------------------
# quality

def top_half(scores: torch.Tensor) -> torch.Tensor:
    """(T, G) -> (T, G) bool, True for each row's top G//2 entries."""
    G = scores.shape[1]
    idx = scores.topk(G // 2, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def coverage(truth: torch.Tensor, chosen: torch.Tensor) -> float:
    """Mean over tokens of the share of true contribution norm held by the chosen groups."""
    return float(((truth * chosen).sum(1) / truth.sum(1)).mean())


def recall(truth: torch.Tensor, chosen: torch.Tensor) -> float:
    true_top = top_half(truth)
    return float(((true_top & chosen).sum(1).float() / true_top.sum(1)).mean())


def quality(predictor: Predictor, static: np.ndarray, xs: dict, ys: dict, ahead: bool = False) -> dict:
    """Coverage and recall of the predicted, the static and the ideal (oracle) top-50% groups."""
    layers = sorted(xs)
    rows = {"predictor": [], "static": [], "oracle": [], "recall_predictor": [], "recall_static": []}
    for i, l in enumerate(layers):
        truth = ys[l].float()
        x = xs[layers[max(0, i - 1)]] if ahead else xs[l]
        with torch.no_grad():
            pred = top_half(predictor(i, x.float()))
        stat = top_half(torch.from_numpy(static[l]).expand_as(truth))
        rows["predictor"].append(coverage(truth, pred))
        rows["static"].append(coverage(truth, stat))
        rows["oracle"].append(coverage(truth, top_half(truth)))
        rows["recall_predictor"].append(recall(truth, pred))
        rows["recall_static"].append(recall(truth, stat))
    return {"covered_share_predictor": float(np.mean(rows["predictor"])),
            "covered_share_static": float(np.mean(rows["static"])),
            "covered_share_oracle": float(np.mean(rows["oracle"])),
            "recall_predictor": float(np.mean(rows["recall_predictor"])),
            "recall_static": float(np.mean(rows["recall_static"])),
            "per_layer_predictor": rows["predictor"], "per_layer_static": rows["static"]}
