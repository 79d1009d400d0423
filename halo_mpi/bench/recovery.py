"""How a run took a link that changed: the changing-loss scenario's figures and plot, computed from
its per-token records (bench/changing_loss.py writes them).

    figures(ms, starts, losses, warmup=8)   -> max ms/token, median per phase, tokens to recover

A record's token is a decode step's index (0: the first token after the prompt's); a phase is the
tokens from its start (the token from which its loss was in place) to the next phase's start.
"""
from __future__ import annotations

import statistics

RECOVERED = 1.2          # back within this factor of the loss-free median (issue 24's target)
WINDOW = 5               # ... judged on the median of this many tokens, so one fast token is not it


def phase_spans(starts: list[int], n: int) -> list[tuple[int, int]]:
    """[start, stop) of each phase over n tokens (empty for a phase the run did not reach)."""
    return [(min(s, n), min(starts[k + 1], n) if k + 1 < len(starts) else n) for k, s in enumerate(starts)]


def loss_end(starts: list[int], losses: list[float]) -> int | None:
    """The token from which the loss is over: the start of the last loss-free phase that follows
    a lossy one (None when the loss never ends)."""
    end = None
    for k in range(1, len(losses)):
        if losses[k] == 0 and losses[k - 1] > 0:
            end = starts[k]
    return end


def tokens_to_recover(ms: list[float], end: int, baseline: float, factor: float = RECOVERED,
                      window: int = WINDOW) -> int | None:
    """Tokens after `end` until the median of `window` tokens from there is within factor x
    baseline; None if that never happens before the run ends."""
    for t in range(end, len(ms) - window + 1):
        if statistics.median(ms[t:t + window]) <= factor * baseline:
            return t - end
    return None


def figures(ms: list[float], starts: list[int], losses: list[float], warmup: int = 0,
            factor: float = RECOVERED, window: int = WINDOW) -> dict:
    """The scenario's figures: the max ms/token (after `warmup` tokens, and over all), each phase's
    median (the first phase without its warm-up), the loss-free median (the first loss-free phase),
    and the tokens from the loss's end until ms/token is back within `factor` of it."""
    spans = phase_spans(starts, len(ms))
    phases = []
    for k, (lo, hi) in enumerate(spans):
        timed = ms[max(lo, warmup):hi]
        phases.append({"loss": losses[k], "start": lo, "tokens": hi - lo,
                       "median_ms": statistics.median(timed) if timed else None,
                       "max_ms": max(timed, default=None)})
    free = next((p["median_ms"] for p in phases if p["loss"] == 0 and p["median_ms"] is not None), None)
    end = loss_end(starts, losses)
    end = end if end is not None and end < len(ms) else None     # (a run stopped before it)
    recover = (tokens_to_recover(ms, end, free, factor, window)
               if end is not None and free is not None else None)
    timed = ms[warmup:]
    return {"max_ms": max(timed, default=None), "max_ms_all": max(ms, default=None),
            "tokens_over_1s": sum(m > 1000 for m in timed), "phases": phases,
            "loss_free_median_ms": free, "loss_end_token": end, "tokens_to_recover": recover,
            "recovered_factor": factor, "recovery_window": window, "warmup": warmup}


def format_figures(f: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.1f}"
    lines = [f"max ms/token {ms(f['max_ms'])} after {f['warmup']} warm-up tokens "
             f"({ms(f['max_ms_all'])} over all; {f['tokens_over_1s']} tokens over 1 s)"]
    for k, p in enumerate(f["phases"]):
        lines.append(f"  phase {k}: loss {p['loss']:g} from token {p['start']} ({p['tokens']} tokens): "
                     f"median {ms(p['median_ms'])} ms/token, max {ms(p['max_ms'])}")
    rec = f["tokens_to_recover"]
    after = (f"after the loss ends (token {f['loss_end_token']}): "
             + ("never back within" if rec is None else f"{rec} tokens until back within")
             + f" {f['recovered_factor']:g}x (median of {f['recovery_window']} tokens)"
             if f["loss_end_token"] is not None else "the run did not reach the loss's end")
    lines.append(f"loss-free median {ms(f['loss_free_median_ms'])} ms/token; {after}")
    return "\n".join(lines)


def plot_scenario(records: list[dict], starts: list[int], losses: list[float], title: str,
                  path: str) -> bool:
    """ms/token, dropped share and each rank's share of the MLP groups over tokens, the phase
    changes marked; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tokens = [r["token"] for r in records]
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    a1.plot(tokens, [r["ms"] for r in records], ".-", lw=0.8, ms=3)
    a1.set(ylabel="ms/token", yscale="log", title=title)
    a2.plot(tokens, [r["dropped_share"] for r in records], ".-", lw=0.8, ms=3, color="tab:red")
    a2.set(ylabel="dropped share")
    ranks = sorted({r for rec in records for r in rec["mlp_share"]}, key=int)
    for r in ranks:
        a3.plot(tokens, [rec["mlp_share"].get(r, 0.0) for rec in records], label=f"rank {r}")
    a3.set(xlabel="token", ylabel="share of MLP groups")
    if ranks:                        # (a run stopped short has no plans to show)
        a3.legend(loc="upper right", fontsize="small")
    for ax in (a1, a2, a3):
        for s in starts:
            ax.axvline(s, color="grey", ls=":", lw=1)
    for s, p in zip(starts, losses):
        a1.annotate(f"loss {p:g}", (s, 1.0), xycoords=("data", "axes fraction"), fontsize="small",
                    xytext=(2, -10), textcoords="offset points")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
