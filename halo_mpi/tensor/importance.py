"""Static importance of MLP neuron groups: each group's mean contribution norm on real text.

    halo-mpi calibrate --weights weights/smollm2-135m.h5      # writes /calibration/static_importance

The scheduler places the least important groups on the least reliable ranks by it, and HALO sync
ranks partials by it when no per-token predictor is used (--placement static).
"""
from __future__ import annotations

import numpy as np


def static_importance(norms: dict[int, np.ndarray]) -> np.ndarray:
    """(n_layers, G): mean contribution norm per group, each layer normalised to sum to 1."""
    imp = np.stack([norms[l].mean(0) for l in sorted(norms)]).astype(np.float32)
    return imp / imp.sum(1, keepdims=True)


def uniform_importance(n_layers: int, groups: int) -> np.ndarray:
    return np.full((n_layers, groups), 1.0 / groups, np.float32)
