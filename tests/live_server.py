"""`halo-mpi serve` started as users start it (a subprocess, under mpiexec for more ranks), for
the serve tests. Traffic goes to 127.0.0.1 only; every server is stopped."""
import json
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from conftest import halo_cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, cmd: list[str], port: int):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        # stderr to a file: a pipe nobody reads while the server runs could fill and stall it
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        end = time.monotonic() + 120
        while True:
            try:
                self.health()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    _, err = self.stop()
                    raise RuntimeError(f"the server did not come up: {err}") from None
                time.sleep(0.3)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
            return json.loads(r.read())

    def client(self, key: str = "unused"):
        from openai import OpenAI
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def post(self, path: str, body, headers: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
        """(status, body) of a POST of `body` (bytes as they are, anything else as JSON)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.stderr()

def serve_cmd(weights, port, ranks: int, *extra) -> list[str]:
    """One rank serves without mpiexec, as users start it."""
    return halo_cmd("serve", "--weights", weights, "--port", port, *extra, ranks=ranks if ranks > 1 else None)


MODES = {"single": (1, ()), "tensor": (2, ("--parallel", "tensor", "--sync", "strict")),
         "pipeline": (2, ("--parallel", "pipeline", "--num-sequences", "2"))}
