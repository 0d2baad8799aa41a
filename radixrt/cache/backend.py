"""Which radix backend runs: the compiled core (``radixrt.cache._radix_native``, built from
``csrc/`` by setup.py) when it loads, else the pure-Python tree, with one log line giving the
true reason the native one is unusable."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
from pathlib import Path
from types import ModuleType

log = logging.getLogger("radixrt.cache")

BACKEND_ENV = "RADIXRT_RADIX_BACKEND"
BACKENDS = ("native", "python")

EXTENSION = "radixrt.cache._radix_native"


def load_extension(name: str = EXTENSION) -> tuple[ModuleType | None, str]:
    """The compiled module, or None and the true reason it is unusable: not built here, built
    for another Python, or present but failing to load (its own error). Looked up with
    ``find_spec`` first so an absent module never surfaces as the misleading "partially
    initialized module (circular import)" error that ``from radixrt.cache import ...`` raises
    while the package itself is still importing."""
    package, _, leaf = name.rpartition(".")
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        dirs = [Path(d) for d in getattr(importlib.import_module(package), "__path__", [])]
        here = importlib.machinery.EXTENSION_SUFFIXES[0]
        other = sorted(f.name for d in dirs for f in d.glob(f"{leaf}.*")
                       if f.suffix in (".so", ".pyd"))
        if other:
            return None, (f"extension {name} was built for another interpreter ({', '.join(other)}"
                          f"; this Python loads {leaf}{here}); rebuild with `pip install -e .`")
        where = dirs[0] if dirs else package
        return None, (f"extension {name} is not built (no {leaf}{here} in {where}); "
                      "`pip install -e .` with a C++ compiler builds it")
    try:
        return importlib.import_module(name), ""
    except ImportError as e:  # present but unloadable: its own error (bad ELF, missing symbol)
        return None, f"extension {spec.origin} failed to load: {e}"


_native, _import_error = load_extension()
_fallback_logged = False


def native_available() -> bool:
    return _native is not None


def native_module() -> ModuleType:
    if _native is None:
        raise RuntimeError(f"the native radix core is unavailable here ({_import_error})")
    return _native


def resolve_backend(backend: str | None = None) -> str:
    """``native`` or ``python``: the argument, else $RADIXRT_RADIX_BACKEND, else native when it
    was built. Asking for native where it is not built is an error; falling back to Python by
    default logs one line."""
    global _fallback_logged
    choice = backend or os.environ.get(BACKEND_ENV) or ""
    if choice and choice not in BACKENDS:
        raise ValueError(f"radix backend {choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "native":
        native_module()  # raises, naming why
        return "native"
    if choice == "python":
        return "python"
    if _native is not None:
        return "native"
    if not _fallback_logged:
        _fallback_logged = True
        log.warning("radixrt: native radix core unavailable (%s); using the pure-Python tree",
                    _import_error)
    return "python"
