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
from .options import add_mode_options, mode_options, open_mode, positive_int


def add_parser(sub):
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve the model on rank 0 over HTTP, in the OpenAI shape: "
                                   "POST /v1/chat/completions and /v1/completions (streaming with "
                                   "\"stream\": true), GET /v1/models and /health. Requests queue "
                                   "on rank 0 and run one at a time (pipeline mode: up to "
                                   "--num-sequences at once); the other ranks follow rank 0's steps.")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    s.add_argument("--queue-size", type=positive_int, default=16,
                   help="requests that may wait; more get 503 (default: %(default)s)")
    s.add_argument("--max-tokens", type=positive_int, default=128,
                   help="tokens to generate when a request gives no max_tokens (default: %(default)s)")
    s.add_argument("--model-name", default=None,
                   help="the model id clients name (default: the store's file name without .h5)")
    add_mode_options(s)
    s.set_defaults(func=run)


def run(a):
    if not 0 < a.port < 65536:
        raise HaloError(f"--port {a.port} is not a TCP port (1-65535)")
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
    server = Server(make_app(broker, engine.tokenizer, name, engine.context, engine.health, a.max_tokens),
                    a.host, a.port)
    server.start()
    on_signals(lambda signum, frame: broker.closed.set())
    ranks = engine.size
    print(f"halo-mpi: serving {name} on http://{a.host}:{a.port}/v1 ({engine.describe_mode()}, "
          f"{ranks} rank{'s' if ranks > 1 else ''}); Ctrl-C ends it", file=sys.stderr, flush=True)
    return server


