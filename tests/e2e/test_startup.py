"""Start-up errors are found before any worker starts: exit 1 with one line, nothing left over."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.conftest import REPO, free_port

GUARD_S = 120.0


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "radixrt.serve", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=GUARD_S)


def assert_one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    errors = [line for line in text.splitlines() if "ERROR" in line]
    assert len(errors) == 1, text
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in text
    assert "started worker" not in text, "nothing heavy may start before the checks"
    assert not re.search(r"IPC socket dir", text), "no private directory was created"
    return errors[0]


def test_busy_port_exits_nonzero_before_loading(tiny_model_dir: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_serve("--model", str(tiny_model_dir("llama")), "--port", str(port))
    assert_one_line_error(out, f"127.0.0.1:{port}", "in use")


def test_missing_model_path(tmp_path: Path) -> None:
    out = run_serve("--model", str(tmp_path / "nope"), "--port", str(free_port()))
    assert_one_line_error(out, "does not exist")


def test_hub_id_is_not_fetched() -> None:
    out = run_serve("--model", "meta-llama/Llama-3.1-8B", "--port", str(free_port()))
    assert_one_line_error(out, "hub ids are not fetched", "meta-llama/Llama-3.1-8B")


def test_directory_without_a_config(tmp_path: Path) -> None:
    out = run_serve("--model", str(tmp_path), "--port", str(free_port()))
    assert_one_line_error(out, "no config.json")


def test_directory_without_weights(tmp_path: Path, tiny_model_dir: Any) -> None:
    (tmp_path / "config.json").write_bytes((tiny_model_dir("llama") / "config.json").read_bytes())
    out = run_serve("--model", str(tmp_path), "--port", str(free_port()))
    assert_one_line_error(out, "no *.safetensors")
