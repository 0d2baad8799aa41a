"""The README's snippets are self-contained and run; its commands name real flags and targets."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from radixrt.cli import serve_parser
from tests.e2e.conftest import REPO

README = (REPO / "README.md").read_text()
GUARD_S = 900


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_has_exactly_the_two_setup_commands() -> None:
    setup = README.split("## Set up and run", 1)[1].split("##", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]


def test_readme_server_commands_use_real_flags_and_targets() -> None:
    known = {s for a in serve_parser()._actions for s in a.option_strings}
    commands = [line for b in blocks("bash") for line in b.splitlines()
                if "radixrt serve" in line or "make serve" in line]
    assert commands, "the README shows how to start the server"
    for line in commands:
        code = line.split("  #", 1)[0].rstrip(" &")
        assert code.startswith((".venv/bin/radixrt serve", "make serve")), (
            f"{code!r} needs an activated venv; use .venv/bin/radixrt or make serve")
        words = shlex.split(code)
        if words[0] == "make":
            args = next(w for w in words if w.startswith("ARGS=")).removeprefix("ARGS=").split()
        else:
            args = words[2:]
        for flag in (w.split("=", 1)[0] for w in args if w.startswith("--")):
            assert flag in known, f"README uses unknown flag {flag} in {line!r}"


def test_make_serve_runs_the_venv_entry_point() -> None:
    # --no-print-directory: under `make test` this runs as a sub-make, which would otherwise
    # print "Entering/Leaving directory" around the recipe.
    out = subprocess.run(["make", "--no-print-directory", "-n", "serve", "ARGS=--port 30001"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == ".venv/bin/radixrt serve --port 30001"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_snippet_runs(index: int, default_model_dir: Path, tmp_path: Path) -> None:
    """Each snippet on its own, in a fresh interpreter, against the default model."""
    code = blocks("python")[index]
    script = tmp_path / f"snippet_{index}.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=GUARD_S)
    assert out.returncode == 0, f"README python block {index} failed:\n{code}\n{out.stderr[-3000:]}"
    assert out.stdout.strip(), "every snippet prints something"
