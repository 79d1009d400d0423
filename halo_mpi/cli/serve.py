"""`halo-mpi serve`: an OpenAI-compatible HTTP API on rank 0; the other ranks follow its steps.

    halo-mpi serve --port 8000
    mpiexec -n 2 halo-mpi serve --parallel tensor --sync strict --host 0.0.0.0 --port 8000 \
        --api-key-file ~/.halo-mpi/api-key
    mpiexec -n 4 halo-mpi serve --parallel pipeline --num-sequences 4
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello"}], "stream": true}'

The model is loaded once; requests queue on rank 0 (halo_mpi/serve/). In one process and in
tensor mode they join the running batch at the next step and leave when done (continuous
batching, up to --max-batch sequences per step; a request's `n` choices are n sequences),
pipeline mode runs up to --num-sequences at once on the ring. SIGTERM or Ctrl-C ends the
streams (finish reason "shutdown") and every rank. On an address other than loopback the API
asks for a key (--api-key or --api-key-file).
"""
from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
import time

from ..errors import HaloError
from ..net.launch import CollectiveError, world_rank
from .options import add_mode_options, mode_options, open_mode, positive_int

MAX_BODY = 4 << 20        # bytes (serve/api.py's default)


def add_parser(sub):
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve the model on rank 0 over HTTP, in the OpenAI shape: "
                                   "POST /v1/chat/completions and /v1/completions (streaming with "
                                   "\"stream\": true), GET /v1/models and /health. Requests queue "
                                   "on rank 0; in one process they run together, up to "
                                   "--max-batch per step (continuous batching); tensor mode runs "
                                   "one at a time, pipeline mode up to --num-sequences at once; the "
                                   "other ranks follow rank 0's steps.")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    s.add_argument("--queue-size", type=positive_int, default=16,
                   help="sequences that may wait (a request's n choices count n); more get 503 "
                        "(default: %(default)s)")
    s.add_argument("--max-tokens", type=positive_int, default=128,
                   help="tokens to generate when a request gives no max_tokens (default: %(default)s)")
    s.add_argument("--model-name", default=None,
                   help="the model id clients name (default: the store's file name without .h5)")
    s.add_argument("--max-body", type=positive_int, default=MAX_BODY, metavar="BYTES",
                   help="largest request body; more gets 413 (default: %(default)s)")
    key = s.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, metavar="KEY",
                     help="clients must send \"Authorization: Bearer KEY\" (every route but /health); "
                          "required when --host is not a loopback address")
    key.add_argument("--api-key-file", default=None, metavar="PATH",
                     help="the key in a file (its first line), kept off the command line and `ps`")
    add_mode_options(s)
    s.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False        # a name: it may resolve to any interface


def api_key(a) -> str | None:
    """The key from --api-key or --api-key-file; a non-loopback --host without one is an error
    (every rank finds it, before anything is loaded)."""
    key = a.api_key
    if a.api_key_file is not None:
        try:
            with open(os.path.expanduser(a.api_key_file)) as f:
                key = f.readline().strip()
        except OSError as e:
            raise CollectiveError(f"--api-key-file {a.api_key_file}: {e.strerror}", world_rank()) from None
        if not key:
            raise CollectiveError(f"--api-key-file {a.api_key_file}: the first line is empty", world_rank())
    if key is not None and not key.strip():
        raise CollectiveError("--api-key is empty", world_rank())
    if key is None and not is_loopback(a.host):
        raise CollectiveError(f"--host {a.host} is not a loopback address: anyone who reaches it could "
                              "use the cluster; give --api-key KEY or --api-key-file PATH", world_rank())
    return key


def run(a):
    if not 0 < a.port < 65536:
        raise HaloError(f"--port {a.port} is not a TCP port (1-65535)")
    a.key = api_key(a)
    from ..serve.broker import Broker
    from ..serve.driver import serve_jobs
    with open_mode(mode_options(a)) as engine:
        if not engine.leads:             # rank 0 ends the others when it is told to end
            on_signals(signal.SIG_IGN)
            engine.generate()
            return
        broker = Broker(a.queue_size)
        server = start_serving(a, broker, engine)
        try:
            serve_jobs(engine, broker, engine.tokenizer)
        finally:
            broker.closed.set()
            server.stop()
        error = engine.report().error
    print("halo-mpi: server stopped", file=sys.stderr)
    if error is not None:
        raise error


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


def start_serving(a, broker, engine) -> Server:
    """Rank 0: the app, its server thread, and signals that close the broker."""
    from ..serve.api import make_app
    name = a.model_name or os.path.splitext(os.path.basename(engine.options.weights))[0]
    app = make_app(broker, engine.tokenizer, name, engine.context, engine.health, a.max_tokens,
                   max_body=a.max_body, api_key=a.key)
    server = Server(app, a.host, a.port)
    server.start()
    on_signals(lambda signum, frame: broker.closed.set())
    ranks = engine.size
    print(f"halo-mpi: serving {name} on http://{a.host}:{a.port}/v1 ({engine.describe_mode()}, "
          f"{ranks} rank{'s' if ranks > 1 else ''}, {engine.describe_batch()}); Ctrl-C ends it",
          file=sys.stderr, flush=True)
    return server


