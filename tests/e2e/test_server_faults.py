"""Faults: client disconnect, load shedding, SIGTERM, start-up errors (worker death and hangs:
test_supervision.py). No wall-clock assertions: waits are hang guards."""

from __future__ import annotations

import asyncio
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
    # Closed mid-stream: the abort must reach the worker and free the pages (400 tokens would
    # otherwise keep it running; the wait is a hang guard, not a timing assertion).
    m = engine_idle(server, timeout=60.0)
    assert_no_request_pages(m)
    assert m['radixrt_requests_total{endpoint="completion",status="cancelled"}'] >= 1
    ok_request(server)


def test_load_shedding_returns_503(server: Server) -> None:
    async def one(c: httpx.AsyncClient, i: int) -> httpx.Response:
        return await c.post(server.url + "/v1/completions",
                            json={"prompt": f"request number {i}", **LONG, "max_tokens": 40})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(8)))

    results = asyncio.run(burst())
    codes = [r.status_code for r in results]
    assert codes.count(503) >= 1 and codes.count(200) >= 2, codes
    shed = [r.json()["error"] for r in results if r.status_code == 503]
    assert all("Too many queued requests" in e["message"] for e in shed), shed
    assert_no_request_pages(engine_idle(server, timeout=60.0))
    ok_request(server)


def test_sigterm_shuts_down_gracefully(server_factory: Any, tiny_model_dir: Any) -> None:
    """SIGTERM during a stream: the stream ends, the router asks its worker to exit and it does
    (no signal, no force-kill), and nothing is left behind. Event-based: how long it takes is
    measured by bench/chaos.py, not asserted here."""
    s = server_factory(tiny_model_dir("llama"), "--shutdown-timeout", "3")
    ipc_dir = s.ipc_dir()
    assert ipc_dir.is_dir() and (ipc_dir.stat().st_mode & 0o777) == 0o700
    workers = s.worker_pids()
    with httpx.stream("POST", s.url + "/v1/completions", timeout=120,
                      json={"prompt": "x", "stream": True, **LONG, "max_tokens": 1000}
                      ) as stream:
        it = stream.iter_lines()
        next(line for line in it if line.startswith("data: "))
        s.proc.send_signal(signal.SIGTERM)
        rest = [line for line in it if line.startswith("data: ")]
    assert rest and rest[-1] == "data: [DONE]", "the in-flight stream ends cleanly"
    assert s.proc.wait(120) == 0  # hang guard only
    log = s.log()
    assert "HTTP server stopped; shutting down workers" in log
    assert "worker 0: shutdown requested" in log, "the worker exits when asked, not signalled"
    for line in ("ignored SIGTERM", "did not exit when asked", "could not send", "Traceback"):
        assert line not in log, f"{line!r} in the shutdown log"
    assert not ipc_dir.exists(), "socket directory must be removed"
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_at_idle_exits_cleanly(server_factory: Any, tiny_model_dir: Any,
                                      sig: signal.Signals) -> None:
    s = server_factory(tiny_model_dir("llama"))
    ipc_dir = s.ipc_dir()
    s.proc.send_signal(sig)
    assert s.proc.wait(120) == 0  # hang guard only
    log = s.log()
    assert "worker 0: shutdown requested" in log and "ignored SIGTERM" not in log
    assert "could not send" not in log
    assert not ipc_dir.exists()


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
