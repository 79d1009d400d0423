#!/usr/bin/env python3
"""A small, bounded load on a running `halo-mpi serve`: N clients at once, each streaming M chat
completions; prints time to first token and tokens/s (per request and for all together).

    python jobs/serve_load.py --url http://127.0.0.1:8000 --clients 4 --requests 2 --max-tokens 32

Standard library only (HTTP and server-sent events by hand), so it runs wherever Python does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request

PROMPTS = ["Tell me about the history of Paris.", "Why is the sky blue?",
           "Write a short poem about the sea.", "How do computers add numbers?"]


def one_request(url: str, prompt: str, max_tokens: int, timeout: float, key: str | None = None) -> dict:
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    t0 = time.perf_counter()
    first = None
    usage = {}
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    n = usage.get("completion_tokens", 0)
    first = first or end
    rate = (n - 1) / (end - first) if n > 1 and end > first else float("nan")
    return {"ttft_s": first - t0, "tokens": n, "decode_tokens_per_s": rate, "wall_s": end - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--clients", type=int, default=1, help="clients at once (default: %(default)s)")
    p.add_argument("--requests", type=int, default=2, help="requests per client (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per request (default: %(default)s)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--api-key-file", help="the server's API key (first line), for a server started with one")
    a = p.parse_args()
    if not (1 <= a.clients <= 64 and 1 <= a.requests <= 100):
        p.error("--clients in 1..64 and --requests in 1..100 (a bounded load)")
    key = None
    if a.api_key_file:
        with open(a.api_key_file) as f:
            key = f.readline().strip()
    rows, errors = [], []

    def client(i: int):
        for j in range(a.requests):
            try:
                rows.append(one_request(a.url, PROMPTS[(i + j) % len(PROMPTS)], a.max_tokens, a.timeout,
                                        key))
            except Exception as e:      # noqa: BLE001 - reported below
                errors.append(f"client {i}: {e}")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        print("\n".join(errors), file=sys.stderr)
    if not rows:
        return 1
    total = sum(r["tokens"] for r in rows)
    out = {"clients": a.clients, "requests": len(rows), "errors": len(errors),
           "ttft_s_median": statistics.median(r["ttft_s"] for r in rows),
           "ttft_s_max": max(r["ttft_s"] for r in rows),
           "decode_tokens_per_s_median": statistics.median(r["decode_tokens_per_s"] for r in rows),
           "tokens_per_s_all": total / wall, "tokens": total, "wall_s": wall}
    print(f"{a.clients} clients x {a.requests} requests: time to first token median "
          f"{out['ttft_s_median']:.2f} s (max {out['ttft_s_max']:.2f}); per request "
          f"{out['decode_tokens_per_s_median']:.1f} tokens/s while streaming; all together "
          f"{out['tokens_per_s_all']:.1f} tokens/s ({total} tokens in {wall:.1f} s); errors {len(errors)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**out, "rows": rows}, f, indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
