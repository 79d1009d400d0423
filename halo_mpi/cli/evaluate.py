"""`halo-mpi evaluate`: teacher-forced perplexity on held-out text, one process or tensor mode.

    halo-mpi evaluate --tokens 512
    mpiexec -n 4 halo-mpi evaluate --parallel tensor --sync halo --link-loss 2:0.05,3:0.05
"""
from __future__ import annotations

from ..errors import HaloError
from ..net.launch import world_size
from ..stats import write_json
from .options import (
    add_dtype_argument,
    add_tensor_arguments,
    add_threads_argument,
    add_weights_argument,
    options_from,
    positive_int,
    set_threads,
)


def add_parser(sub):
    e = sub.add_parser("evaluate", help="teacher-forced perplexity on held-out text",
                       description="Teacher-forced perplexity on held-out text (default: pydoc "
                                   "topics disjoint from calibration), one decode step per token, "
                                   "through the same engine, sync and emulated loss as generate.")
    add_weights_argument(e)
    e.add_argument("--text", help="a text file or folder instead of the default held-out text")
    e.add_argument("--tokens", type=positive_int, default=128, help="tokens to score (default: %(default)s)")
    e.add_argument("--parallel", choices=["none", "tensor"], default="none",
                   help="none: the reference; tensor: the tensor-parallel engine (default: %(default)s)")
    add_dtype_argument(e)
    add_threads_argument(e)
    e.add_argument("--seed", type=int, default=0, help="seed of the loss emulation (default: %(default)s)")
    e.add_argument("--json", help="write the result to this JSON file")
    add_tensor_arguments(e)
    e.set_defaults(func=run)


def held_out_ids(a, store) -> list[int]:
    from ..model.texts import evaluation_text, read_text
    from ..model.tokenizer import Tokenizer
    text = read_text(a.text) if a.text else evaluation_text()
    return Tokenizer.from_store(store).encode(text)[: a.tokens + 1]


def run(a):
    set_threads(a.threads)
    if a.parallel == "tensor":
        return evaluate_tensor(a)
    if world_size() > 1:
        raise HaloError("evaluate runs on one rank, or on many with --parallel tensor")
    import torch

    from ..model.evaluate import perplexity, teacher_forced_nll
    from ..model.generate import LocalSession
    from ..model.llama import Transformer
    from ..store.hdf5 import Store
    with Store(a.weights) as store:
        ids = held_out_ids(a, store)
        model = Transformer.from_store(store, dtype=a.dtype)
    with torch.inference_mode():
        nll = teacher_forced_nll(LocalSession(model, len(ids)), ids)
    result = {"mode": "single", "perplexity": perplexity(nll), "tokens": len(nll)}
    print(f"perplexity {result['perplexity']:.3f} over {len(nll)} held-out tokens (single process)")
    if a.json:
        write_json(a.json, result)


def evaluate_tensor(a):
    """Teacher-forced perplexity through the tensor-parallel engine, under the same loss."""
    import numpy as np
    import torch

    from ..model.evaluate import perplexity, teacher_forced_nll
    from ..net.launch import collective, world_comm
    from ..tensor.coordinator import TensorParallelSession
    from ..tensor.run import TensorOptions, end_if_silent, open_and_plan, run_tensor

    comm = world_comm(a.rank_timeout)
    rank, size = comm.Get_rank(), comm.Get_size()
    options = options_from(TensorOptions, a)

    def setup():
        store, plan = open_and_plan(a.weights, rank, size, options)
        return store, plan, held_out_ids(a, store) if rank == 0 else None

    store, plan, ids = collective(comm, setup)

    def drive(coordinator, model):
        with torch.inference_mode():
            session = TensorParallelSession(model, coordinator, len(ids), options.prefill_chunk)
            return teacher_forced_nll(session, ids)

    run = run_tensor(comm, store, plan, drive)
    store.close()
    if rank != 0:
        return
    dropped = [r.dropped_share for r in run.coordinator.records if r.decoding]
    result = {"mode": "tensor", "sync": plan.policy.mode, "placement": options.placement,
              "perplexity": perplexity(run.result), "tokens": len(run.result),
              "dropped_share_mean": float(np.mean(dropped)) if dropped else 0.0,
              "link_loss": {str(k): v for k, v in plan.loss.items()}}
    print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} held-out tokens "
          f"(tensor, {plan.policy.mode}, {options.placement}, loss {plan.loss or 'none'}); "
          f"dropped importance share {result['dropped_share_mean']:.4f}")
    if a.json:
        write_json(a.json, result)
    end_if_silent(run)
