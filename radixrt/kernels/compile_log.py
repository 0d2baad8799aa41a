"""Which Triton kernels compiled, and how long each took: the stalls a request pays for.

A Triton kernel compiles on first launch for every new specialization (constexprs, and integer
arguments that equal 1 or are divisible by 16, pointer alignment). On an H200 one compile takes
0.2-2 s, and the step that triggers it stalls every running request. The engine's warm-up
(engine/warmup.py) compiles the common variants at start; this log shows what still compiled
later, so benchmarks can report it and a missing warm-up case is found, not guessed.

Triton keeps one cache hook and one post-compile hook (``triton.knobs.runtime``); a log chains to
whatever hook was installed before it and restores it on ``close``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompileEvent:
    kernel: str  # the jitted function's qualified name
    started_s: float  # perf_counter at the cache miss
    seconds: float  # cache miss to compiled (disk-cache hits are fast but still counted)


@dataclass
class CompileLog:
    """Records Triton JIT compiles between construction and ``close`` (also a context manager)."""

    events: list[CompileEvent] = field(default_factory=list)
    _pending: dict[str, tuple[str, float]] = field(default_factory=dict)
    _runtime: Any = None
    _prev_cache: Any = None
    _prev_post: Any = None

    def __post_init__(self) -> None:
        try:
            from triton import knobs
        except ImportError:  # no Triton, or one without knobs (< 3.4): nothing compiles here
            return
        self._runtime = knobs.runtime
        self._prev_cache = self._runtime.jit_cache_hook
        self._prev_post = self._runtime.jit_post_compile_hook
        self._runtime.jit_cache_hook = self._on_cache_miss
        self._runtime.jit_post_compile_hook = self._on_compiled

    @property
    def active(self) -> bool:
        return self._runtime is not None

    def _on_cache_miss(self, **kw: Any) -> Any:
        self._pending[str(kw.get("key"))] = (_kernel_name(kw), time.perf_counter())
        # A truthy return would tell Triton to skip the compile: pass on the previous hook's.
        return self._prev_cache(**kw) if self._prev_cache is not None else None

    def _on_compiled(self, **kw: Any) -> Any:
        name, t0 = self._pending.pop(str(kw.get("key")), (_kernel_name(kw), time.perf_counter()))
        self.events.append(CompileEvent(name, t0, time.perf_counter() - t0))
        return self._prev_post(**kw) if self._prev_post is not None else None

    def close(self) -> None:
        """Put back the hooks that were there before (only if ours are still installed)."""
        rt, self._runtime = self._runtime, None
        if rt is None:
            return
        if rt.jit_cache_hook == self._on_cache_miss:
            rt.jit_cache_hook = self._prev_cache
        if rt.jit_post_compile_hook == self._on_compiled:
            rt.jit_post_compile_hook = self._prev_post

    def __enter__(self) -> CompileLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self) -> dict[str, Any]:
        """JSON-able: how many compiles, their seconds, and count and seconds per kernel (most
        seconds first)."""
        per: dict[str, list[float]] = {}
        for e in self.events:
            per.setdefault(e.kernel, []).append(e.seconds)
        return {
            "count": len(self.events),
            "seconds": round(sum(e.seconds for e in self.events), 3),
            "kernels": {k: {"count": len(v), "seconds": round(sum(v), 3)}
                        for k, v in sorted(per.items(), key=lambda kv: -sum(kv[1]))},
        }


def _kernel_name(kw: dict[str, Any]) -> str:
    fn = kw.get("fn")
    name = getattr(fn, "name", None)
    if isinstance(name, str):
        return name
    rep = kw.get("repr")
    return rep.split("[", 1)[0] if isinstance(rep, str) else "?"
