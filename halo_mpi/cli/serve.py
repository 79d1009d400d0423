"""`halo-mpi serve`: an OpenAI-compatible HTTP API on rank 0; the other ranks follow its steps.

    halo-mpi serve --port 8000
    mpiexec -n 2 halo-mpi serve --parallel tensor --sync strict --host 0.0.0.0 --port 8000
    mpiexec -n 4 halo-mpi serve --parallel pipeline --num-sequences 4
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello"}], "stream": true}'

The model is loaded once; requests queue on rank 0 (halo_mpi/serve/) and run one at a time
through the same session generate uses, or in pipeline mode up to --num-sequences at once on the
ring. SIGTERM or Ctrl-C ends the streams and every rank.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

from ..errors import HaloError
from ..net.launch import CollectiveError, world_rank, world_size
from .options import (
    add_dtype_argument,
    add_load_arguments,
    add_tensor_arguments,
    add_threads_argument,
    add_weights_argument,
    load_options,
    options_from,
    positive_int,
    set_threads,
)


def add_parser(sub):
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve the model on rank 0 over HTTP, in the OpenAI shape: "
                                   "POST /v1/chat/completions and /v1/completions (streaming with "
                                   "\"stream\": true), GET /v1/models and /health. Requests queue "
                                   "on rank 0 and run one at a time (pipeline mode: up to "
                                   "--num-sequences at once); the other ranks follow rank 0's steps.")
    add_weights_argument(s)
    s.add_argument("--parallel", choices=["none", "tensor", "pipeline"], default="none",
                   help="none: one process; tensor: HALO tensor parallelism over the ranks, one "
                        "request at a time; pipeline: layer blocks on a ring, --num-sequences "
                        "requests at once (default: %(default)s)")
    s.add_argument("--num-sequences", type=positive_int, default=None,
                   help="pipeline mode: requests generated at once on the ring (default: one per rank)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    s.add_argument("--queue-size", type=positive_int, default=16,
                   help="requests that may wait; more get 503 (default: %(default)s)")
    s.add_argument("--max-tokens", type=positive_int, default=128,
                   help="tokens to generate when a request gives no max_tokens (default: %(default)s)")
    s.add_argument("--model-name", default=None,
                   help="the model id clients name (default: the store's file name without .h5)")
    add_dtype_argument(s)
    add_threads_argument(s)
    add_tensor_arguments(s)
    add_load_arguments(s)
    s.set_defaults(func=run)


def run(a):
    set_threads(a.threads)
    if not 0 < a.port < 65536:
        raise HaloError(f"--port {a.port} is not a TCP port (1-65535)")
    if a.parallel == "tensor":
        return serve_tensor(a)
    if a.parallel == "pipeline":
        return serve_ring_mode(a)
    if world_size() > 1:
        raise CollectiveError(f"this run has {world_size()} MPI ranks; serve with --parallel tensor, "
                              f"or launch with -n 1", world_rank())        # every rank: said once
    return serve_single(a)


class Server:
    """uvicorn in a thread of rank 0 (the main thread drives the model)."""

    def __init__(self, app, host: str, port: int):
        import uvicorn
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="http")
        self.host, self.port = host, port

    def start(self, timeout: float = 30.0):
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise HaloError(f"cannot listen on {self.host}:{self.port} (in use, or not an address "
                                f"of this node); choose another --host or --port")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def on_signals(handler):
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def start_serving(a, broker, tok, store, context: int, health) -> Server:
    """Rank 0: the app, its server thread, and signals that close the broker."""
    from ..serve.api import make_app
    name = a.model_name or os.path.splitext(os.path.basename(store.path))[0]
    server = Server(make_app(broker, tok, name, context, health, a.max_tokens), a.host, a.port)
    server.start()
    on_signals(lambda signum, frame: broker.closed.set())
    print(f"halo-mpi: serving {name} on http://{a.host}:{a.port}/v1 ({health()['mode']}, "
          f"{health()['ranks']} rank{'s' if health()['ranks'] > 1 else ''}); Ctrl-C ends it",
          file=sys.stderr, flush=True)
    return server


def serve_single(a):
    from ..loading.parts import budgeted_transformer
    from ..model.generate import LocalSession
    from ..model.llama import Transformer
    from ..model.tokenizer import Tokenizer
    from ..serve.broker import Broker
    from ..serve.driver import serve_sessions
    from ..store.hdf5 import Store

    load = load_options(a)
    store = Store(a.weights)              # open while serving: a budgeted model reads from it
    weights = None
    try:
        tok = Tokenizer.from_store(store)
        if load.mem_budget:
            model, weights = budgeted_transformer(store, load, a.dtype)
            print(f"memory: {weights.describe()}", file=sys.stderr)
        else:
            model = Transformer.from_store(store, dtype=a.dtype)
        broker = Broker(a.queue_size)
        server = start_serving(a, broker, tok, store, store.args.max_seq_len,
                               lambda: {"mode": "none", "ranks": 1})
    except BaseException:
        store.close()
        raise
    try:
        serve_sessions(broker, tok, lambda max_len: LocalSession(model, max_len), tok.stop_ids)
    finally:
        broker.closed.set()
        server.stop()
        if weights is not None:
            weights.close()
        store.close()
    print("halo-mpi: server stopped", file=sys.stderr)


def serve_tensor(a):
    from ..model.tokenizer import Tokenizer
    from ..net.launch import collective, world_comm
    from ..serve.broker import Broker
    from ..serve.driver import serve_sessions
    from ..tensor.coordinator import TensorParallelSession
    from ..tensor.run import TensorOptions, describe, end_if_silent, open_and_plan, run_tensor

    comm = world_comm(a.rank_timeout)
    rank, size = comm.Get_rank(), comm.Get_size()
    options = options_from(TensorOptions, a, load=load_options(a))
    store, plan = collective(comm, lambda: open_and_plan(a.weights, rank, size, options))
    if rank != 0:            # rank 0 ends the workers (STOP) when it is told to end
        on_signals(signal.SIG_IGN)
        run_tensor(comm, store, plan, drive=None)
        store.close()
        return
    print(describe(plan, store), file=sys.stderr)
    tok, broker, links = Tokenizer.from_store(store), Broker(a.queue_size), {}

    def health() -> dict:
        return {"mode": f"tensor ({plan.policy.mode}{', all-reduce' if plan.exchange else ''})",
                "ranks": size, "link_on_time_rate": {str(r): round(v.on_time_rate, 4)
                                                     for r, v in links.items()}}

    server = start_serving(a, broker, tok, store, store.args.max_seq_len, health)

    def drive(coordinator, model):
        links.update(coordinator.links)
        return serve_sessions(broker, tok, lambda max_len: TensorParallelSession(
            model, coordinator, max_len, options.prefill_chunk), tok.stop_ids)
    try:
        run = run_tensor(comm, store, plan, drive)
    finally:
        broker.closed.set()
        server.stop()
        store.close()
    end_if_silent(run)
    print("halo-mpi: server stopped", file=sys.stderr)


def serve_ring_mode(a):
    """Pipeline mode: rank 0 serves and conducts; the other ranks run their blocks."""
    from ..model.tokenizer import Tokenizer
    from ..net.devices import read_device_profile
    from ..net.launch import world_comm
    from ..pipeline.ring import Options
    from ..pipeline.run import collectively, serve_pipeline
    from ..serve.broker import Broker
    from ..serve.driver import serve_ring
    from ..store.hdf5 import Store

    comm = world_comm(a.rank_timeout)
    rank, size = comm.Get_rank(), comm.Get_size()
    devices = collectively(comm, lambda: read_device_profile(a.device_profile, size).ranks
                           if rank == 0 and a.device_profile else None)
    if rank != 0:
        on_signals(signal.SIG_IGN)          # rank 0 stops the ring when it is told to end
        serve_pipeline(comm, a.weights, options_from(Options, a, load=load_options(a)), drive=None,
                       devices=devices)
        return
    store = Store(a.weights)
    tok = Tokenizer.from_store(store)
    options = options_from(Options, a, in_flight=a.num_sequences or size, stop_ids=frozenset(tok.stop_ids),
                           load=load_options(a))
    broker = Broker(a.queue_size)
    server = start_serving(a, broker, tok, store, store.args.max_seq_len, lambda: {
        "mode": f"pipeline ({options.in_flight} in flight)", "ranks": size})
    store.close()
    try:
        serve_pipeline(comm, a.weights, options, devices=devices,
                       drive=lambda ring, stage, clock: serve_ring(broker, tok, ring, stage, clock, options))
    finally:
        broker.closed.set()
        server.stop()
    print("halo-mpi: server stopped", file=sys.stderr)
