"""`halo-mpi evaluate`: teacher-forced perplexity on held-out text, in any mode.

    halo-mpi evaluate --tokens 512
    mpiexec -n 4 halo-mpi evaluate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05
    halo-mpi evaluate --mem-budget 50% --weights weights/smollm2-135m-q4.h5
"""
from __future__ import annotations

from ..stats import write_json
from .options import add_mode_options, mode_options, open_mode, positive_int


def add_parser(sub):
    e = sub.add_parser("evaluate", help="teacher-forced perplexity on held-out text",
                       description="Teacher-forced perplexity on held-out text (default: pydoc "
                                   "topics disjoint from calibration), one decode step per token, "
                                   "through the same engine, sync and emulated loss as generate.")
    e.add_argument("--text", help="a text file or folder instead of the default held-out text")
    e.add_argument("--tokens", type=positive_int, default=128, help="tokens to score (default: %(default)s)")
    e.add_argument("--sequences", type=positive_int, default=1,
                   help="score the text as this many consecutive parts decoded together, one "
                        "batched step for all (one process and tensor mode, up to --max-batch; "
                        "pipeline mode scores one sequence at a time); each part's first token is "
                        "context only (default: %(default)s)")
    e.add_argument("--json", help="write the result to this JSON file")
    add_mode_options(e)
    e.set_defaults(func=run)


def held_out_ids(a, tok) -> list[int]:
    from ..model.texts import evaluation_text, read_text
    text = read_text(a.text) if a.text else evaluation_text()
    return tok.encode(text)[: a.tokens + 1]


def run(a):
    from ..model.evaluate import perplexity
    from ..modes.engine import Workload
    options = mode_options(a)
    with open_mode(options, lambda tok, context: Workload(score=held_out_ids(a, tok))) as engine:
        nll = engine.perplexity(sequences=a.sequences)
        report = engine.report()
    if report is None:
        return
    s = report.stats.as_json()
    config = {k: s["config"][k] for k in ("sync", "placement", "link_loss") if k in s["config"]}
    result = {"mode": s["mode"], "ranks": s["ranks_total"], "perplexity": perplexity(nll), "tokens": len(nll),
              "sequences": a.sequences,
              "dropped_share_mean": s["dropped_share_mean"], **config}
    how = ", ".join([s["mode"]] + [str(config[k]) for k in ("sync", "placement") if k in config]
                    + ([f"loss {config['link_loss'] or 'none'}"] if "link_loss" in config else []))
    parts = f" in {a.sequences} batched sequences" if a.sequences > 1 else ""
    print(f"perplexity {result['perplexity']:.3f} over {len(nll)} held-out tokens{parts} ({how}); dropped "
          f"importance share {result['dropped_share_mean']:.4f}")
    if a.json:
        write_json(a.json, result)
    if report.error is not None:
        raise report.error
