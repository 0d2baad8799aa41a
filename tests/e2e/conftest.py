"""Run the real server (`python -m radixrt.serve`) in a subprocess for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ipc_dir(self) -> Path:
        m = re.search(r"IPC socket dir: (\S+)", self.log())
        assert m, "the router logs its socket directory at startup"
        return Path(m.group(1))

    def worker_pids(self) -> list[int]:
        return [int(x) for x in re.findall(r"started worker \d+ \(pid (\d+)\)", self.log())]

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("server did not exit within the SIGTERM timeout") from None
        return self.proc.returncode


def start_server(model: Path | None, tmp: Path, *args: str, api_key: str | None = None,
                 startup_timeout: float = 180.0) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "radixrt.serve", "--port", str(port), *args]
    if model is not None:
        cmd += ["--model", str(model)]
    if api_key:
        cmd += ["--api-key", api_key]
    log_path = tmp / f"server-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path, api_key)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited during startup:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise AssertionError(f"server not healthy after {startup_timeout}s:\n{server.log()[-4000:]}")


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """``factory(model, *args, api_key=None) -> Server``; every server is stopped at the end."""
    started: list[Server] = []
    tmp = tmp_path_factory.mktemp("servers")

    def factory(model: Path | None, *args: str, api_key: str | None = None) -> Server:
        s = start_server(model, tmp, *args, api_key=api_key)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()
