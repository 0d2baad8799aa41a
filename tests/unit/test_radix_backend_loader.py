"""The native core's loader names the true reason it is unusable (runs with or without it built).

A missing extension once read "cannot import name '_radix_native' from partially initialized
module 'radixrt.cache' (most likely due to a circular import)": the import ran while the
package was still initializing. These tests import the package fresh in a subprocess, from a
copy of the sources with the extension removed or replaced by a broken file, and read the one
fallback log line.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import radixrt
from radixrt.cache.backend import load_extension

PACKAGE = Path(radixrt.__file__).parent
LEAF = "_radix_native"
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]

PROBE = """
import logging, sys
logging.basicConfig(stream=sys.stdout, format="%(message)s")
from radixrt.cache.prefix_cache import make_prefix_cache
from radixrt.cache import PageAllocator, native_available
cache = make_prefix_cache(PageAllocator(4), 1, True)
print("available", native_available(), type(cache).__name__)
"""


def copy_without_extension(dest: Path) -> Path:
    """The radixrt sources under dest, with no compiled extension."""
    shutil.copytree(PACKAGE, dest / "radixrt",
                    ignore=shutil.ignore_patterns("__pycache__", f"{LEAF}*"))
    return dest / "radixrt" / "cache"


def probe(root: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RADIXRT_RADIX_BACKEND"}
    env["PYTHONPATH"] = str(root)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=root, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_absent_extension_says_not_built(tmp_path: Path) -> None:
    cache_dir = copy_without_extension(tmp_path)
    out = probe(tmp_path)
    assert "circular import" not in out and "partially initialized" not in out, out
    assert (f"native radix core unavailable (extension radixrt.cache.{LEAF} is not built "
            f"(no {LEAF}{SUFFIX} in {cache_dir})") in out, out
    assert out.count("native radix core unavailable") == 1, "one log line, not one per cache"
    assert "available False RadixCache" in out, out


def test_broken_extension_reports_its_own_load_error(tmp_path: Path) -> None:
    cache_dir = copy_without_extension(tmp_path)
    broken = cache_dir / f"{LEAF}{SUFFIX}"
    broken.write_bytes(b"not an ELF file")
    out = probe(tmp_path)
    assert f"extension {broken} failed to load:" in out, out
    assert "circular import" not in out, out
    assert "available False RadixCache" in out, out


def test_extension_for_another_interpreter_is_named(tmp_path: Path) -> None:
    cache_dir = copy_without_extension(tmp_path)
    stray = f"{LEAF}.cpython-39-x86_64-linux-gnu.so"
    (cache_dir / stray).write_bytes(b"\x7fELF")
    out = probe(tmp_path)
    assert f"was built for another interpreter ({stray}; this Python loads {LEAF}{SUFFIX})" in out
    assert "available False RadixCache" in out, out


def test_load_extension_of_a_missing_module_in_process() -> None:
    module, reason = load_extension("radixrt.cache._no_such_extension")
    assert module is None
    assert reason.startswith("extension radixrt.cache._no_such_extension is not built (no "), reason


def test_asking_for_native_where_it_is_absent_names_the_reason(tmp_path: Path) -> None:
    copy_without_extension(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "RADIXRT_RADIX_BACKEND": "native"}
    done = subprocess.run(
        [sys.executable, "-c", "from radixrt.cache.backend import resolve_backend; resolve_backend()"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert f"the native radix core is unavailable here (extension radixrt.cache.{LEAF} is not built" \
        in done.stderr, done.stderr


@pytest.mark.skipif(not (PACKAGE / "cache" / f"{LEAF}{SUFFIX}").exists(),
                    reason="native radix core not built here")
def test_built_extension_loads_without_reason() -> None:
    module, reason = load_extension()
    assert module is not None and reason == "", reason
