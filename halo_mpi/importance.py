"""Static importance of MLP neuron groups: each group's mean contribution norm on real text.

    halo-mpi calibrate --weights weights/smollm2-135m.h5      # writes /calibration/static_importance

Until the per-token predictor exists, HALO sync ranks partials by this: rank 0 waits for the
partials that carry the critical share of it and places the least important groups on the
unstable ranks.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from .model import Transformer


def group_contributions(model: Transformer, ids: list[int], chunk: int = 256, progress: bool = True):
    """Run the reference model over ids; yield (layer, norms (T, G)) of each group's contribution."""
    cache = model.new_cache(len(ids))
    records: dict[int, list[torch.Tensor]] = {l: [] for l in model.blocks}
    originals = {l: b.feed_forward for l, b in model.blocks.items()}

    def recording(layer, mlp):
        def forward(x):
            records[layer].append(mlp.per_group(x).norm(dim=-1))   # (T, G, dim) -> (T, G)
            return mlp(x)
        return forward

    try:
        for l, b in model.blocks.items():
            b.feed_forward = recording(l, originals[l])
        with torch.inference_mode():
            for start in tqdm(range(0, len(ids), chunk), desc="calibrate", unit="chunk", disable=not progress):
                model(torch.tensor(ids[start:start + chunk]), cache, last_only=True)
    finally:
        for l, b in model.blocks.items():
            b.feed_forward = originals[l]
    return {l: torch.cat(r).numpy() for l, r in records.items()}


def static_importance(norms: dict[int, np.ndarray]) -> np.ndarray:
    """(n_layers, G): mean contribution norm per group, each layer normalised to sum to 1."""
    imp = np.stack([norms[l].mean(0) for l in sorted(norms)]).astype(np.float32)
    return imp / imp.sum(1, keepdims=True)


def uniform_importance(n_layers: int, groups: int) -> np.ndarray:
    return np.full((n_layers, groups), 1.0 / groups, np.float32)
