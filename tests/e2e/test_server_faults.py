"""Faults: client disconnect, load shedding, worker death, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, start_server

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(server_factory: Any, tiny_model_dir: Any) -> Server:
    return server_factory(tiny_model_dir("llama"), "--max-running-requests", "1",
                          "--max-queued-requests", "2", "--shutdown-timeout", "5")


def engine_idle(server: Server, timeout: float = 10.0) -> dict[str, float]:
    """Wait until the worker reports no running request; return the metrics then."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m['radixrt_running_requests{worker="0"}'] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def assert_no_request_pages(m: dict[str, float]) -> None:
    assert m['radixrt_running_requests{worker="0"}'] == 0
    assert m['radixrt_kv_pages{worker="0",state="private"}'] == 0
    assert m['radixrt_kv_pages{worker="0",state="locked"}'] == 0
    total = m['radixrt_kv_pages{worker="0",state="total"}']
    free = m['radixrt_kv_pages{worker="0",state="free"}']
    evictable = m['radixrt_kv_pages{worker="0",state="evictable"}']
    assert free + evictable == total


def ok_request(server: Server) -> None:
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"prompt": "after the fault", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_client_disconnect_aborts_and_frees_pages(server: Server) -> None:
    body = {"prompt": "a long story " * 20, "stream": True, **LONG}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as s:
        lines = s.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
                if got == 3:
                    break
    # Closed mid-stream. The abort must reach the worker and free the pages within a step.
    t0 = time.monotonic()
    m = engine_idle(server, timeout=5.0)
    assert time.monotonic() - t0 < 5.0
    assert_no_request_pages(m)
    assert m['radixrt_requests_total{endpoint="completion",status="cancelled"}'] >= 1
    ok_request(server)


def test_load_shedding_returns_503_at_once(server: Server) -> None:
    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, float]:
        t0 = time.monotonic()
        r = await c.post(server.url + "/v1/completions",
                         json={"prompt": f"request number {i}", **LONG, "max_tokens": 40})
        return r.status_code, time.monotonic() - t0

    async def burst() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(8)))

    results = asyncio.run(burst())
    codes = [c for c, _ in results]
    assert codes.count(503) >= 1 and codes.count(200) >= 2, codes
    assert all(dt < 3.0 for c, dt in results if c == 503), "503 must come at once"
    ok_request(server)


def test_sigterm_shuts_down_gracefully(server_factory: Any, tiny_model_dir: Any) -> None:
    s = server_factory(tiny_model_dir("llama"), "--shutdown-timeout", "3")
    ipc_dir = s.ipc_dir()
    assert ipc_dir.is_dir() and (ipc_dir.stat().st_mode & 0o777) == 0o700
    workers = s.worker_pids()
    with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                      json={"prompt": "x", "stream": True, **LONG, "max_tokens": 100000 // 100}
                      ) as stream:
        it = stream.iter_lines()
        next(line for line in it if line.startswith("data: "))
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        rest = list(it)  # in-flight stream ends (finishes, or is cut at the timeout)
    assert s.proc.wait(15) is not None
    assert time.monotonic() - t0 < 15
    assert isinstance(rest, list)
    assert not ipc_dir.exists(), "socket directory must be removed"
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_worker_death(server_factory: Any, tiny_model_dir: Any) -> None:
    s = server_factory(tiny_model_dir("llama"))
    (pid,) = s.worker_pids()
    body = {"prompt": "doomed", "stream": True, **LONG}
    events: list[str] = []
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as stream:
        it = stream.iter_lines()
        first = next(line for line in it if line.startswith("data: "))
        events.append(first)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        events.extend(line for line in it if line.startswith("data: "))
    assert time.monotonic() - t0 < 5.0, "in-flight request must end promptly"
    errors = [json.loads(e[6:]) for e in events if e.startswith("data: {\"error\"")]
    assert errors and "died" in errors[0]["error"]["message"]
    h = httpx.get(s.url + "/health", timeout=5)
    assert h.status_code == 503 and "dead" in h.json()["reason"]
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert r.status_code == 503 and "No worker" in r.json()["error"]["message"]
    assert "SIGKILL" in s.log()  # the router says why


def test_engine_config_error_stops_startup_with_its_message(tmp_path: Any) -> None:
    """An engine option the worker cannot honour (deterministic inference on a CPU) makes the
    server exit non-zero at startup, naming the option, with its socket directory removed."""
    with pytest.raises(AssertionError, match="server exited during startup") as err:
        start_server(None, tmp_path, "--model", "llama-tiny", "--load-format", "dummy",
                     "--enable-deterministic-inference")
    log = str(err.value)
    assert "deterministic_inference: needs device='cuda'" in log
    assert "Traceback" not in log.split("server failed:")[-1], "noisy shutdown after the failure"
    ipc_dirs = [line.split("IPC socket dir: ")[1].strip() for line in log.splitlines()
                if "IPC socket dir: " in line]
    assert ipc_dirs and not any(os.path.exists(d) for d in ipc_dirs), "socket dir left behind"
