"""Supervision: dead and hung workers are replaced, deadlines end requests, the worker does not
outlive its router, secrets stay out of argv. Timeouts here are hang guards, never assertions."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import REPO, Server, free_port

LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}
GUARD_S = 120.0  # hang guard for waits below


def wait_for(what: str, cond: Any, timeout: float = GUARD_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def health(s: Server) -> tuple[int, dict[str, Any]]:
    r = httpx.get(s.url + "/health", timeout=10)
    return r.status_code, r.json()


def pid_gone(pid: int) -> bool:
    """Exited and reaped, or exited and waiting for a parent that is not ours (re-parented)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def reaped(pid: int) -> bool:
    """Gone from the process table: its parent (the router) waited for it, no zombie left."""
    return not os.path.exists(f"/proc/{pid}")


def current_worker_pid(s: Server) -> int:
    return s.worker_pids()[-1]


def stream_events_after(s: Server, body: dict[str, Any], action: Any) -> list[dict[str, Any]]:
    """Start a stream, run ``action()`` after its first event, return the events after it."""
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True},
                      headers=s.headers, timeout=GUARD_S) as stream:
        assert stream.status_code == 200
        it = stream.iter_lines()
        next(line for line in it if line.startswith("data: {"))
        action()
        for line in it:
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return events


def ok_completion(s: Server) -> None:
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "after", "max_tokens": 3},
                   headers=s.headers, timeout=GUARD_S)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


@pytest.fixture(scope="module")
def server(server_factory: Any, tiny_model_dir: Any) -> Server:
    return server_factory(tiny_model_dir("llama"), "--worker-hang-timeout", "3")


def test_killed_worker_fails_its_requests_with_503_and_is_restarted(server: Server) -> None:
    pid = current_worker_pid(server)
    events = stream_events_after(server, {"prompt": "doomed", **LONG},
                                 lambda: os.kill(pid, signal.SIGKILL))
    err = events[-1].get("error")
    assert err is not None and err["code"] == 503, events[-1:]
    assert "died" in err["message"] and "SIGKILL" in err["message"]
    assert "restarted" in err["message"], "the client is told to retry"
    wait_for("the killed worker to be reaped", lambda: reaped(pid))
    wait_for("a replacement", lambda: current_worker_pid(server) != pid)
    wait_for("health back to 200", lambda: health(server)[0] == 200)
    ok_completion(server)
    assert "restarting it" in server.log()


def test_request_during_restart_waits_for_the_new_worker(server: Server) -> None:
    pid = current_worker_pid(server)
    os.kill(pid, signal.SIGKILL)
    code, body = wait_for("the router to notice", lambda: (lambda h: h[0] == 503 and h)(
        health(server)))
    assert "restarting" in body["reason"]
    ok_completion(server)  # sent while the replacement loads; answered once it is ready
    wait_for("the killed worker to be reaped", lambda: reaped(pid))


def test_hung_worker_is_killed_and_replaced(server: Server) -> None:
    pid = current_worker_pid(server)
    events = stream_events_after(server, {"prompt": "frozen", **LONG},
                                 lambda: os.kill(pid, signal.SIGSTOP))
    err = events[-1].get("error")
    assert err is not None and err["code"] == 503, events[-1:]
    assert "hung" in err["message"]
    wait_for("the hung worker to be killed and reaped", lambda: reaped(pid))
    wait_for("health back to 200", lambda: health(server)[0] == 200)
    ok_completion(server)


def test_worker_config_is_not_in_argv(server_factory: Any, tiny_model_dir: Any) -> None:
    s = server_factory(tiny_model_dir("llama"), api_key="sk-secret-in-config")
    pid = current_worker_pid(s)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert not any(b"sk-secret-in-config" in a for a in argv), argv
    path = Path(argv[argv.index(b"--config-file") + 1].decode())
    assert path.parent == s.ipc_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert "sk-secret-in-config" in path.read_text()


def test_request_timeout_ends_a_long_request(server_factory: Any, tiny_model_dir: Any) -> None:
    s = server_factory(tiny_model_dir("llama"), "--request-timeout", "1")
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "slow", **LONG, "max_tokens": 2000},
                   timeout=GUARD_S)
    assert r.status_code == 504 and "deadline" in r.json()["error"]["message"], r.text
    assert "--request-timeout" in r.json()["error"]["message"]
    m = wait_for("the worker to go idle", lambda: (lambda x: x if x[
        'radixrt_running_requests{worker="0"}'] == 0 else None)(s.metrics()))
    assert m['radixrt_kv_pages{worker="0",state="locked"}'] == 0
    assert m['radixrt_kv_pages{worker="0",state="private"}'] == 0
    ok_completion(s)
    # A request's own, shorter timeout ends it the same way (504 naming it); a bad one is a 400.
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "slow", **LONG, "max_tokens": 2000,
                                                    "timeout": 0.5}, timeout=GUARD_S)
    body = r.json()["error"]
    assert r.status_code == 504 and body["param"] == "timeout" and "its timeout" in body["message"]
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "timeout": -1}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "timeout", r.text
    ok_completion(s)


def test_restart_limit_leaves_the_worker_dead(server_factory: Any, tiny_model_dir: Any) -> None:
    s = server_factory(tiny_model_dir("llama"), "--max-worker-restarts", "0")
    pid = current_worker_pid(s)
    os.kill(pid, signal.SIGKILL)
    code, body = wait_for("the router to notice", lambda: (lambda h: h[0] == 503 and h)(
        health(s)))
    assert "dead" in body["reason"] and "restart limit" in body["reason"]
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert r.status_code == 503 and "No worker" in r.json()["error"]["message"]
    wait_for("the dead worker to be reaped", lambda: reaped(pid))
    assert s.worker_pids() == [pid], "no restart past the limit"


def test_worker_exits_and_removes_the_ipc_dir_when_the_router_is_killed(
        tmp_path: Path, tiny_model_dir: Any) -> None:
    port = free_port()
    log_path = tmp_path / "router.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log_path.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "radixrt.serve", "--port", str(port),
                                 "--model", str(tiny_model_dir("llama"))],
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the server", up)
        text = log_path.read_text()
        ipc_dir = Path(re.findall(r"IPC socket dir: (\S+)", text)[0])
        (pid,) = (int(x) for x in re.findall(r"started worker \d+ \(pid (\d+)\)", text))
        proc.kill()
        proc.wait()
        wait_for("the orphaned worker to exit", lambda: pid_gone(pid))
        wait_for("the IPC dir to be removed", lambda: not ipc_dir.exists())
        assert "router process is gone" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
