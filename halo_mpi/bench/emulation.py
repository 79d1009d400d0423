"""Fitting the emulated loss model (net/loss.py) to real kernel TCP on the testbed (root).

    halo-mpi bench --calibrate-emulation --loss 0.01,0.03,0.05 --out results/calibration
"""
from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from ..errors import HaloError
from ..net.loss import LinkLoss
from ..stats import write_json
from ..testbed.bed import Testbed
from ..testbed.delays import measure_delays, summarize

CAL_SIZES = (1024, 2336, 8192)   # one segment; one layer message of SmolLM2 (576 floats + header); 6 segments


def fit_loss_model(real: dict, mtu: int = 1500) -> dict:
    """LinkLoss('tcp') parameters from testbed one-way delays: real[loss][size] -> samples (ms).
    A one-segment message's stall share is fitted as c p^2 (pooled over the loss levels, so the
    levels with most stalls weigh most); the rest as c p."""
    multi, double, fast, single_fast, fast_delays = [], [], [], [], []
    single_stalls, single_weight = 0.0, 0.0
    for loss, by_size in real.items():
        if loss <= 0:
            continue
        for size, xs in by_size.items():
            xs = np.asarray(xs)
            stalls = (xs >= 100).mean()
            one_segment = -(-size // mtu) == 1
            if one_segment:
                single_stalls += stalls * len(xs)
                single_weight += loss * loss * len(xs)
            else:
                multi.append(stalls / loss)
            if stalls > 0:
                double.append((xs >= 300).mean() / stalls / loss)
            quick = xs[(xs >= 1) & (xs < 100)]
            (single_fast if one_segment else fast).append(len(quick) / len(xs) / loss)
            fast_delays.extend(quick.tolist())
    mean = lambda v, d: float(np.mean(v)) if v else d     # noqa: E731
    lo, hi = (np.quantile(fast_delays, [0.05, 0.95]) if len(fast_delays) > 10 else (1.0, 10.0))
    return {"stall_per_p": mean(multi, 1.2),
            "single_per_p2": single_stalls / single_weight if single_weight else 2.8,
            "double_per_p": mean(double, 1.18), "fast_per_p": mean(fast, 2.5),
            "single_fast_per_p": mean(single_fast, 0.7),
            "fast_lo_ms": float(max(lo, 1.0)), "fast_hi_ms": float(max(hi, 1.5))}


def emulated_samples(base_ms: list[float], loss: float, size: int, n: int, params: dict, seed: int = 0):
    """The emulation over the same network: a loss-free testbed delay plus the emulated hold."""
    model = LinkLoss({1: loss}, seed=seed, **params)
    rng = np.random.default_rng(seed)
    base = np.asarray(base_ms)
    return [float(rng.choice(base)) + 1e3 * model.delay(0 if i % 2 else 1, 1 if i % 2 else 0, size)
            for i in range(n)]


def calibrate_emulation(losses: list[float], out: str, count: int = 1000, log=print) -> dict:
    real: dict[float, dict[int, list[float]]] = {}
    failed = None
    with Testbed(2, {1: 0.0}) as tb:
        for loss in tqdm([0.0] + [l for l in losses if l > 0], desc="testbed delays", unit="loss"):
            try:
                res = measure_delays(tb, list(CAL_SIZES), loss, count)
            except HaloError as e:   # e.g. 30% loss outlasting the ping-pong's time limit
                if loss == 0.0:
                    raise
                failed = f"loss {loss:g}: {e}"
                log(f"{failed}; fitting and comparing the levels measured before it")
                break
            real[loss] = {s: res["sizes"][str(s)]["forward_ms"] + res["sizes"][str(s)]["back_ms"]
                          for s in CAL_SIZES}
    if len(real) < 2:
        raise HaloError(f"no lossy level was measured ({failed}); nothing to fit")
    params = fit_loss_model(real)
    rows = []
    for loss in (l for l in sorted(real) if l > 0):
        for size in CAL_SIZES:
            r = summarize(real[loss][size])
            e = summarize(emulated_samples(real[0.0][size], loss, size, len(real[loss][size]), params))
            ratio = {q: max(r[q], e[q]) / max(min(r[q], e[q]), 1e-9) for q in ("p95", "p99")}
            rows.append({"loss": loss, "size": size, "real": r, "emulated": e,
                         "p95_ratio": ratio["p95"], "p99_ratio": ratio["p99"],
                         "within_2x": ratio["p95"] <= 2 and ratio["p99"] <= 2})
    result = {"fitted_params": params, "count": count, "rows": rows, "not_measured": failed,
              "real_loss_free": {s: summarize(real[0.0][s]) for s in CAL_SIZES}}
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "results.json"), result)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(calibration_markdown(result))
    return result


def calibration_markdown(r: dict) -> str:
    p = r["fitted_params"]
    lines = ["# Emulated loss vs real kernel TCP (testbed, 2 ranks, loss on rank 1's link)", "",
             f"One-way arrival delays of ping-pong messages, {r['count']} round trips per cell. "
             "Emulated = a loss-free testbed delay plus the `tcp` model's hold, with the parameters "
             f"fitted from these measurements: stall_per_p {p['stall_per_p']:.2f}, single_per_p2 "
             f"{p['single_per_p2']:.2f}, double_per_p {p['double_per_p']:.2f}, fast_per_p "
             f"{p['fast_per_p']:.2f}, single_fast_per_p {p['single_fast_per_p']:.2f}.", "",
             "| loss | bytes | real median / p95 / p99 / max (ms) "
             "| emulated median / p95 / p99 / max (ms) | p95, p99 ratio | within 2x |",
             "|---|---|---|---|---|---|"]
    if r.get("not_measured"):
        lines[1:1] = ["", f"Not measured: {r['not_measured']}."]
    fmt = lambda s: f"{s['median']:.2f} / {s['p95']:.1f} / {s['p99']:.1f} / {s['max']:.0f}"  # noqa: E731
    for x in r["rows"]:
        lines.append(f"| {x['loss']:g} | {x['size']} | {fmt(x['real'])} | {fmt(x['emulated'])} | "
                     f"{x['p95_ratio']:.1f}x, {x['p99_ratio']:.1f}x | {'yes' if x['within_2x'] else 'no'} |")
    return "\n".join(lines) + "\n"
