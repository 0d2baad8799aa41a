"""Does one huge request stall the router? /health latency while a large body is tokenized.

    .venv/bin/python bench/bench_router_stall.py [--repo DIR] [--mb 10] [--out stall.json]

Starts a server (the tests' tiny Llama: random weights, real tokenizer) from ``--repo``
(default: this checkout; point it at an older one for a before/after), raises its body limit
to fit, sends one chat request with ``--mb`` MB of text and, meanwhile, polls ``/health`` every
20 ms. Prints one JSON object: the big request's status and time, and the /health latencies
seen while it was in flight (count, p50, max). Loopback only; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
GUARD_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(repo: Path, model: Path, log: Path, legacy: bool, mb: float) -> tuple[Any, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "radixrt.serve", "--port", str(port), "--model", str(model)]
    if not legacy:
        cmd += ["--max-request-bytes", str(int(mb * 1.1e6) + 65536)]
    env = {**os.environ, "PYTHONPATH": str(repo), "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=repo, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + GUARD_S
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)


def measure(url: str, mb: float) -> dict[str, Any]:
    body = json.dumps({"messages": [{"role": "user", "content": "lorem ipsum " * int(mb * 1e6 / 12)}],
                       "max_tokens": 1}).encode()
    result: dict[str, Any] = {}

    def big() -> None:
        t = time.monotonic()
        try:
            r = httpx.post(url + "/v1/chat/completions", content=body, timeout=GUARD_S,
                           headers={"Content-Type": "application/json"})
            result["status"] = r.status_code
        except httpx.HTTPError as e:
            result["status"] = f"{type(e).__name__}"
        result["seconds"] = round(time.monotonic() - t, 3)

    th = threading.Thread(target=big)
    th.start()
    lat: list[float] = []
    with httpx.Client(base_url=url, timeout=GUARD_S) as c:
        while th.is_alive():
            t = time.monotonic()
            c.get("/health")
            lat.append(time.monotonic() - t)
            time.sleep(0.02)
    th.join()
    return {"body_bytes": len(body), "big_request": result, "health_polls": len(lat),
            "health_p50_s": round(statistics.median(lat), 4) if lat else None,
            "health_max_s": round(max(lat), 3) if lat else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=str(REPO), help="checkout to run the server from")
    ap.add_argument("--legacy", action="store_true",
                    help="the checkout predates --max-request-bytes (pass no limit flags)")
    ap.add_argument("--mb", type=float, default=10.0, help="size of the big body in MB")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="radixrt-stall-"))
    sys.path.insert(0, str(REPO))
    from tests.fixtures.tiny_models import TinyModelFactory

    model = TinyModelFactory(tmp)("llama")
    proc, url = start(Path(args.repo), model, tmp / "server.log", args.legacy, args.mb)
    try:
        out = {"repo": args.repo, **measure(url, args.mb)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = json.dumps(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
