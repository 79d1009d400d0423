"""What SIGTERM (or Ctrl-C) does to a serving `halo-mpi serve`: it starts the server, one stream
of up to 100 tokens and enough other requests that one waits in the queue, signals the server
after the stream's third chunk, and prints the time until the stream ended, its finish reason,
what the others got, and the exit status and time.

    python jobs/serve_shutdown.py single|tensor|pipeline [--weights PATH] [--signal INT]

`--signal INT` sends SIGINT to the whole process group, as Ctrl-C in a terminal does.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

MODES = {"single": [], "tensor": ["--parallel", "tensor", "--sync", "strict"],
         "pipeline": ["--parallel", "pipeline", "--num-sequences", "2"]}
BODY = {"prompt": "Once upon a time", "max_tokens": 100, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict):
    return urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                                         {"Content-Type": "application/json"}), timeout=300)


def ask(url: str, answers: list):
    try:
        with post(url, BODY) as r:
            answers.append((r.status, json.loads(r.read())["choices"][0]["finish_reason"]))
    except urllib.error.HTTPError as e:
        answers.append((e.code, json.loads(e.read())["error"]["message"]))


def health(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=list(MODES))
    p.add_argument("--weights", default="weights/smollm2-135m.h5")
    p.add_argument("--signal", choices=["TERM", "INT"], default="TERM")
    a = p.parse_args()
    port, here = free_port(), os.path.dirname(os.path.abspath(sys.executable))
    cmd = [sys.executable, "-m", "halo_mpi.cli", "serve", "--weights", a.weights, "--port", str(port),
           *MODES[a.mode]]
    if a.mode != "single":
        cmd = [os.path.join(here, "mpiexec"), "-n", "2", *cmd]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            health(url)
            break
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"the server did not start: {proc.stderr.read()}")
            time.sleep(0.3)
    chunks, finish, answers, threads = 0, None, [], []
    with post(url, {**BODY, "stream": True}) as stream:
        for line in stream:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            chunks += 1
            if chunks == 3:         # running: one more request per free slot, and one that queues
                threads = [threading.Thread(target=ask, args=(url, answers))
                           for _ in range(2 if a.mode == "pipeline" else 1)]
                for t in threads:
                    t.start()
                while health(url)["queued"] < 1:
                    time.sleep(0.05)
                t0 = time.monotonic()
                if a.signal == "INT":
                    os.killpg(proc.pid, signal.SIGINT)
                else:
                    proc.send_signal(signal.SIGTERM)
            if chunk.get("choices") and chunk["choices"][0]["finish_reason"]:
                finish = chunk["choices"][0]["finish_reason"]
    stream_s = time.monotonic() - t0
    code = proc.wait(timeout=120)
    exit_s = time.monotonic() - t0
    for t in threads:
        t.join()
    print(f"{a.mode}, SIG{a.signal}: the stream ended {stream_s:.2f} s after the signal (finish_reason "
          f"{finish!r}, {chunks} chunks); the others: {answers}; exit {code} after {exit_s:.2f} s")


if __name__ == "__main__":
    main()
