"""Chaos run against a real server on loopback: 200 concurrent streams with client disconnects,
aborts and hostile inputs, one ``kill -9`` of the worker mid-run, then the server's state at
idle and how long a SIGTERM shutdown takes. Bounded: every request and wait has a deadline.

    .venv/bin/python bench/chaos.py [--model DIR] [--streams 200] [--out chaos.json]

Without --model it builds the tests' tiny Llama (random weights, real tokenizer) in a temp dir.
Prints one JSON object: completed / failed (by cause) / 5xx / leaked pages at idle / time to
recover after the kill / shutdown time. Target: 0 leaked pages, and no 5xx other than the 503s
of the requests in flight on the killed worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
GUARD_S = 300.0  # no request or wait runs longer than this

# A handful of the inputs that used to crash or wedge the server (issue 13); each must get a 4xx.
HOSTILE: list[tuple[str, bytes]] = [
    ("deep_json", b"[" * 100_000 + b"]" * 100_000),
    ("nan_temperature", b'{"prompt": "x", "temperature": NaN}'),
    ("inf_temperature", b'{"prompt": "x", "temperature": Infinity}'),
    ("lone_surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("seed_2_64_n2", b'{"prompt": "x", "seed": 18446744073709551615, "n": 2, "max_tokens": 2}'),
    ("seed_2_70", b'{"prompt": "x", "seed": 1180591620717411303424, "max_tokens": 2}'),
    ("top_k_2_70", b'{"text": "x", "sampling_params": {"top_k": 1180591620717411303424}}'),
    ("not_json", b"{this is not json"),
    ("wrong_types", b'{"prompt": 5, "max_tokens": "many"}'),
]
HOSTILE_PATH = {"lone_surrogate": "/v1/chat/completions", "top_k_2_70": "/generate"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


MAX_TOKENS = 32


async def stream_one(c: httpx.AsyncClient, url: str, i: int, kind: str) -> dict[str, Any]:
    """kind: full (read to the end), disconnect (leave after 2 events), abort (non-streaming,
    give up after 0.3 s)."""
    body = {"prompt": f"Story {i}: once upon a time", "max_tokens": MAX_TOKENS, "temperature": 0.8,
            "seed": i, "ignore_eos": True}
    rec: dict[str, Any] = {"kind": kind, "status": None, "error": None}
    try:
        if kind == "abort":
            r = await c.post(url + "/v1/completions", json=body, timeout=0.3)
            rec["status"] = r.status_code
            if r.status_code != 200:
                rec["error"] = r.json().get("error")
            return rec
        async with c.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                            timeout=GUARD_S) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                rec["error"] = json.loads(r.text).get("error")
                return rec
            events = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                events += 1
                ev = json.loads(line[6:])
                if "error" in ev:
                    rec["error"] = ev["error"]
                if kind == "disconnect" and events == 2:
                    rec["left_early"] = True
                    return rec
            rec["events"] = events
    except httpx.TimeoutException:
        rec["timed_out_client_side"] = True
    except httpx.HTTPError as e:
        rec["transport_error"] = repr(e)
    return rec


async def hostile_one(c: httpx.AsyncClient, url: str, name: str, body: bytes) -> dict[str, Any]:
    path = HOSTILE_PATH.get(name, "/v1/completions")
    try:
        r = await c.post(url + path, content=body, timeout=GUARD_S,
                         headers={"Content-Type": "application/json"})
        return {"kind": "hostile", "name": name, "status": r.status_code}
    except httpx.HTTPError as e:
        return {"kind": "hostile", "name": name, "status": None, "transport_error": repr(e)}


async def wait_recovered(url: str, t_kill: float) -> dict[str, float]:
    """Seconds from the kill until /health is 200 again (a worker is back), and until a new
    request completes (it queues behind the requests that waited for the restart)."""
    out: dict[str, float] = {}
    async with httpx.AsyncClient() as c:

        async def health() -> int:
            try:
                return (await c.get(url + "/health", timeout=10)).status_code
            except httpx.HTTPError:
                return 0

        # The router notices within one monitor tick: first see it unhealthy, then healthy.
        while time.monotonic() - t_kill < GUARD_S and await health() == 200:
            await asyncio.sleep(0.02)
        while time.monotonic() - t_kill < GUARD_S and await health() != 200:
            await asyncio.sleep(0.02)
        out["healthy"] = time.monotonic() - t_kill
        while time.monotonic() - t_kill < GUARD_S:
            try:
                r = await c.post(url + "/v1/completions", timeout=GUARD_S,
                                 json={"prompt": "probe", "max_tokens": 1})
                if r.status_code == 200:
                    out["served"] = time.monotonic() - t_kill
                    return out
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError("server did not recover")


async def drive(url: str, worker_pid: int, streams: int, seed: int,
                spread_s: float) -> dict[str, Any]:
    rng = random.Random(seed)
    kinds = [rng.choice(["full"] * 6 + ["disconnect"] * 2 + ["abort"]) for _ in range(streams)]
    limits = httpx.Limits(max_connections=streams + 50, max_keepalive_connections=streams + 50)
    async def later(delay: float, coro: Any) -> dict[str, Any]:
        await asyncio.sleep(delay)
        return await coro  # type: ignore[no-any-return]

    async with httpx.AsyncClient(limits=limits) as c:
        # Arrivals spread over spread_s; the kill lands in the middle, so some streams finish
        # before it, some are in flight on the killed worker, and some arrive while it restarts.
        tasks = [asyncio.create_task(later(spread_s * i / streams, stream_one(c, url, i, k)))
                 for i, k in enumerate(kinds)]
        tasks += [asyncio.create_task(hostile_one(c, url, n, b)) for n, b in HOSTILE]
        await asyncio.sleep(spread_s / 2)
        os.kill(worker_pid, signal.SIGKILL)
        t_kill = time.monotonic()
        recover = asyncio.create_task(wait_recovered(url, t_kill))
        tasks += [asyncio.create_task(hostile_one(c, url, n, b)) for n, b in HOSTILE]
        records = await asyncio.wait_for(asyncio.gather(*tasks), GUARD_S)
        return {"records": records, "time_to_recover_s": await recover}


def outcome(r: dict[str, Any]) -> str:
    """One disjoint outcome per stream."""
    e = r.get("error") or {}
    if e.get("code") == 503 and "died" in e.get("message", ""):
        return "failed_503_on_killed_worker"
    if e or "transport_error" in r or (r["status"] not in (None, 200)):
        return "failed_other"
    if r.get("left_early") or r.get("timed_out_client_side"):
        return "left_early_by_client"
    return "completed"


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    streams = [r for r in records if r["kind"] != "hostile"]
    hostile = [r for r in records if r["kind"] == "hostile"]
    five = [r for r in records if (r["status"] or 0) >= 500
            or (r.get("error") or {}).get("code", 0) >= 500]
    outcomes = [outcome(r) for r in streams]
    return {
        "streams": len(streams),
        **{k: outcomes.count(k) for k in ("completed", "left_early_by_client",
                                           "failed_503_on_killed_worker", "failed_other")},
        "transport_errors": sum("transport_error" in r for r in records),
        "hostile_sent": len(hostile),
        "hostile_4xx": sum(400 <= (r["status"] or 0) < 500 for r in hostile),
        "5xx_total": len(five),
        "5xx_not_from_the_kill": sum(outcome(r) != "failed_503_on_killed_worker" for r in five),
    }


def start_server(model: str, log_path: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    model_args = [] if model == "default" else ["--model", model]
    with log_path.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "radixrt.serve", "--port", str(port),
                                 "--host", "127.0.0.1", *model_args],
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + GUARD_S
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log_path
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def worker_pid(log_path: Path) -> int:
    return int(re.findall(r"started worker 0 \(pid (\d+)\)", log_path.read_text())[-1])


def orphan_exit(model: str, log_path: Path) -> dict[str, Any]:
    """kill -9 an idle router: how long until its worker has exited and removed the IPC dir."""
    proc, _, _ = start_server(model, log_path)
    pid = worker_pid(log_path)
    ipc_dir = Path(re.findall(r"IPC socket dir: (\S+)", log_path.read_text())[0])
    proc.kill()
    t0 = time.monotonic()
    proc.wait()
    while time.monotonic() - t0 < GUARD_S:
        try:
            with open(f"/proc/{pid}/stat") as f:
                alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            alive = False
        if not alive and not ipc_dir.exists():
            break
        time.sleep(0.01)
    return {"orphaned_worker_exit_s": round(time.monotonic() - t0, 3),
            "orphaned_ipc_dir_removed": not ipc_dir.exists()}


def build_tiny_model(root: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.fixtures.tiny_models import TinyModelFactory

    return TinyModelFactory(root)("llama")


def main() -> int:
    global MAX_TOKENS, GUARD_S
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="HF dir, or 'default' for the default model (default: the tests' tiny "
                    "Llama)")
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spread", type=float, default=8.0,
                    help="seconds over which the streams arrive; the kill is at half of it")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="per stream")
    ap.add_argument("--guard", type=float, default=GUARD_S,
                    help="seconds any one request or wait may take before the run is failed")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    MAX_TOKENS, GUARD_S = args.max_tokens, args.guard
    tmp = Path(tempfile.mkdtemp(prefix="radixrt-chaos-"))
    model = args.model or str(build_tiny_model(tmp))
    proc, url, log_path = start_server(model, tmp / "server.log")
    try:
        pid = worker_pid(log_path)
        t0 = time.monotonic()
        run = asyncio.run(drive(url, pid, args.streams, args.seed, args.spread))
        wall = time.monotonic() - t0
        deadline = time.monotonic() + GUARD_S
        # Idle: nothing running, and no page held by a request (cache-held pages are evictable).
        while True:
            m = metrics(url)
            if m['radixrt_running_requests{worker="0"}'] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        leaked = (m['radixrt_kv_pages{worker="0",state="private"}']
                  + m['radixrt_kv_pages{worker="0",state="locked"}'])
        idle_ok = (m['radixrt_kv_pages{worker="0",state="free"}']
                   + m['radixrt_kv_pages{worker="0",state="evictable"}']
                   == m['radixrt_kv_pages{worker="0",state="total"}'])
        healthy = httpx.get(url + "/health", timeout=10).status_code == 200
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(GUARD_S)
        shutdown_s = time.monotonic() - t_term
        log = log_path.read_text()
        out = {
            **summarize(run["records"]),
            "leaked_pages_at_idle": int(leaked),
            "free_plus_evictable_equals_total": idle_ok,
            "queued_at_idle": int(m['radixrt_queued_requests{worker="0"}']),
            "healthy_after": healthy,
            "time_to_healthy_after_kill_s": round(run["time_to_recover_s"]["healthy"], 2),
            "time_to_first_new_response_after_kill_s": round(
                run["time_to_recover_s"]["served"], 2),
            "wall_s": round(wall, 2),
            "shutdown_s_at_idle": round(shutdown_s, 2),
            "shutdown_exit_code": code,
            "force_killed": "ignored SIGTERM" in log or "did not exit when asked" in log,
            **orphan_exit(model, tmp / "orphan.log"),
            "model": model if args.model else "tests' tiny llama",
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = (out["leaked_pages_at_idle"] == 0 and out["5xx_not_from_the_kill"] == 0
          and out["healthy_after"] and not out["force_killed"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
