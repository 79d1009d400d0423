"""`halo-mpi calibrate`: regroup neurons, measure static importance, fit the importance predictors.

    halo-mpi calibrate --weights weights/smollm2-135m.h5 --regroup --report

1. `--regroup` (optional, once per store): permute each MLP layer's intermediate neurons so that
   neurons active on the same tokens share a group. The MLP sums over its neurons, so the model's
   output is unchanged (to float rounding), but per-token importance concentrates in fewer groups:
   on SmolLM2-135M the ideal top-50% groups hold ~0.60-0.69 of the contribution norm instead of
   ~0.57-0.60 with contiguous slices. Groups come from recursive balanced bisection along the first
   principal component of the neurons' (normalised) contribution patterns on calibration text.
2. Static importance: each group's mean contribution norm, per layer normalised to 1.
3. Predictors (`current` and one layer `ahead`), see predictor.py.
Everything is written under /calibration in the store; `--report` evaluates on held-out text.
"""
from __future__ import annotations

import h5py
import numpy as np
import torch
from tqdm import tqdm

from ..errors import HaloError
from ..model.llama import Transformer
from ..model.texts import calibration_text, evaluation_text
from ..model.tokenizer import Tokenizer
from ..store.hdf5 import Store, layer_path, write_calibration
from ..store.integrity import put_checksums
from .importance import static_importance
from .predictor import Predictor, collect, model_flops_per_token, quality, train


def neuron_contributions(model: Transformer, xs: dict) -> dict[int, torch.Tensor]:
    """|activation| x ||down column|| of every neuron: layer -> (T, hidden)."""
    out = {}
    for l, x in xs.items():
        mlp = model.blocks[l].feed_forward
        gate, up = mlp.gate_up(x).split(mlp.hidden, dim=-1)
        down_norm = mlp.down.weight().norm(dim=0)          # W_down (dim, H): a column's norm
        out[l] = (torch.nn.functional.silu(gate) * up).abs() * down_norm       # (T, H)
    return out


def balanced_bisection(features: torch.Tensor, groups: int) -> torch.Tensor:
    """Order of rows such that consecutive blocks of rows/groups are similar rows (equal sizes)."""
    size = features.shape[0] // groups
    parts: list[torch.Tensor] = []

    def split(idx: torch.Tensor, g: int):
        if g == 1:
            parts.append(idx)
            return
        x = features[idx] - features[idx].mean(0)
        _, _, v = torch.pca_lowrank(x, q=1, center=False, niter=4)
        order = idx[torch.argsort(x @ v[:, 0])]
        left = g // 2
        split(order[: left * size], left)
        split(order[left * size:], g - left)

    split(torch.arange(features.shape[0]), groups)
    return torch.cat(parts)


def regroup(path: str, model: Transformer, xs: dict, progress: bool = True) -> np.ndarray:
    """Rewrite every layer's mlp_groups with neurons reordered by co-activation; returns orders."""
    G, gs = model.args.mlp_groups, model.args.group_size
    contrib = neuron_contributions(model, xs)
    orders = []
    torch.manual_seed(0)
    with h5py.File(path, "r+") as f:
        for l in tqdm(sorted(contrib), desc="regroup", unit="layer", disable=not progress):
            pattern = (contrib[l] / (contrib[l].sum(1, keepdim=True) + 1e-9)).T       # (H, T)
            pattern = pattern / (pattern.norm(dim=1, keepdim=True) + 1e-9)
            order = balanced_bisection(pattern, G).numpy()                             # (H,)
            ds = f[f"{layer_path(l)}/mlp_groups"]                                        # (G, 3, gs, dim)
            w = ds[()].transpose(1, 0, 2, 3).reshape(3, G * gs, -1)                      # (3, H, dim)
            # back to (G, 3, gs, dim)
            regrouped = np.ascontiguousarray(w[:, order].reshape(3, G, gs, -1).transpose(1, 0, 2, 3))
            ds[...] = regrouped
            put_checksums(f, ds.name.lstrip("/"), regrouped)
            orders.append(order)
        old = f.get("calibration/neuron_order")
        composed = np.stack(orders) if old is None else np.take_along_axis(old[()], np.stack(orders), 1)
    write_calibration(path, {"neuron_order": composed.astype(np.int32)})
    return composed


def calibrate(path: str, text: str | None, tokens: int, rank: int, do_regroup: bool,
              progress: bool = True, log=print) -> dict:
    with Store(path) as store:
        if store.f.attrs.get("shard_size") is not None:
            raise HaloError(f"{path} is a shard; calibrate the full store, then shard it again")
        if do_regroup and store.store_dtype != "float32":
            raise HaloError(f"{path} is a {store.store_dtype} store: regrouping moves neurons across "
                            f"quantization blocks; calibrate it without --regroup, or regroup the "
                            f"float32 store and convert that")
        tok = Tokenizer.from_store(store)
        ids = tok.encode(text or calibration_text())[:tokens]
        model = Transformer.from_store(store)
    xs, ys = collect(model, ids, progress=progress)
    if do_regroup:
        regroup(path, model, xs, progress)
        with Store(path) as store:
            model = Transformer.from_store(store)
        xs, ys = collect(model, ids, progress=progress)
    static = static_importance({l: y.numpy() for l, y in ys.items()})
    current = train(xs, ys, rank, progress=progress)
    ahead = train(xs, ys, rank, ahead=True, progress=progress)
    write_calibration(path, {"static_importance": static, **current.arrays("current"),
                             **ahead.arrays("ahead")},
                      {"tokens": len(ids), "text": "custom" if text else "pydoc_data.topics calibration set",
                       "predictor_rank": current.rank, "regrouped": bool(do_regroup)})
    low = np.sort(static, 1)[:, : static.shape[1] // 2].sum(1)
    log(f"calibrated {path} on {len(ids)} tokens{' (neurons regrouped)' if do_regroup else ''}: "
        f"least important half of the groups holds {100 * np.median(low):.0f}% of the static "
        f"importance (median over layers); predictors of rank {current.rank} written")
    return {"tokens": len(ids)}


def report(path: str, tokens: int = 1024, text: str | None = None, progress: bool = True) -> dict:
    """Predictor quality on held-out text (topics disjoint from calibration)."""
    with Store(path) as store:
        static = store.calibration("static_importance")
        current, ahead = Predictor.from_store(store, "current"), Predictor.from_store(store, "ahead")
        if static is None or current is None:
            raise HaloError(f"{path} has no predictor; run `halo-mpi calibrate` first")
        ids = Tokenizer.from_store(store).encode(text or evaluation_text())[:tokens]
        model = Transformer.from_store(store)
        args = store.args
        regrouped = bool(store.f["calibration"].attrs.get("regrouped", False))
    xs, ys = collect(model, ids, progress=progress)
    q = quality(current, static, xs, ys)
    qa = quality(ahead, static, xs, ys, ahead=True)
    return {"held_out_tokens": len(ids), "groups": args.mlp_groups, "regrouped": regrouped,
            "predictor_rank": current.rank,
            "covered_share_predictor": q["covered_share_predictor"],
            "covered_share_static": q["covered_share_static"],
            "covered_share_oracle": q["covered_share_oracle"],
            "recall_predictor": q["recall_predictor"], "recall_static": q["recall_static"],
            "covered_share_predictor_ahead": qa["covered_share_predictor"],
            "recall_predictor_ahead": qa["recall_predictor"],
            "predictor_flops_share": current.flops_per_token() / model_flops_per_token(args),
            "per_layer_predictor": q["per_layer_predictor"], "per_layer_static": q["per_layer_static"]}


def format_report(r: dict) -> str:
    return (f"held-out text, {r['held_out_tokens']} tokens, {r['groups']} groups per layer"
            f"{' (regrouped)' if r['regrouped'] else ''}: share of true contribution norm covered by "
            f"the top 50% of groups: predictor {r['covered_share_predictor']:.3f} (one layer ahead "
            f"{r['covered_share_predictor_ahead']:.3f}), static {r['covered_share_static']:.3f}, ideal "
            f"{r['covered_share_oracle']:.3f}; recall of the true top 50%: predictor "
            f"{r['recall_predictor']:.3f}, static {r['recall_static']:.3f}; predictor cost "
            f"{100 * r['predictor_flops_share']:.2f}% of the model's FLOPs (rank {r['predictor_rank']})")
