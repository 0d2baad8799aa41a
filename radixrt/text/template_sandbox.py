"""Client-supplied chat templates, rendered in a child process with a deadline and a memory cap.

A chat template is Jinja: even in Jinja's sandbox, ``{% for i in range(N) %}`` nested a few
times or ``'x' * 10**9`` runs for seconds or eats memory, and a thread cannot be stopped. So a
template from a request renders in one long-lived child (spawned, never forked from the router's
threads) under ``RLIMIT_AS``; one that overruns its deadline gets the child killed and a fresh
one started for the next request. Renders are serialized: one child, one template at a time.
The model's own template is trusted and renders in the router's text pool as before.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import resource
import threading
from typing import Any

# The child may grow this much over its size after importing the renderer.
_CHILD_EXTRA_BYTES = 1 << 30
# Spawning a child and importing transformers' renderer: not charged to a template's deadline.
_STARTUP_TIMEOUT_S = 120.0


class TemplateError(Exception):
    """The template failed, overran its deadline or its output limit: the client's input."""


class TemplateBusy(Exception):
    """Other client templates held the renderer for a whole deadline: the server is busy."""


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize missing from /proc/self/status")


def _child_init() -> None:
    from transformers.utils import chat_template_utils  # noqa: F401  (import before the cap)

    limit = _vm_bytes() + _CHILD_EXTRA_BYTES
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
            continue_final_message: bool, kwargs: dict[str, Any], max_chars: int) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        # Annotated as str, it returns (rendered conversations, generation indices).
        rendered: Any = render_jinja_template(
            [messages], chat_template=template, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **kwargs)
    except MemoryError:
        raise TemplateError("the chat_template used too much memory") from None
    except Exception as e:  # jinja errors, raise_exception(), bad kwargs: the client's input
        raise TemplateError(f"{type(e).__name__}: {e}") from None
    text = str(rendered[0][0])
    if len(text) > max_chars:
        raise TemplateError(f"the chat_template produced {len(text)} characters; the limit is "
                            f"{max_chars}")
    return text


class TemplateSandbox:
    def __init__(self, timeout_s: float, max_chars: int) -> None:
        assert timeout_s > 0 and max_chars > 0, "a deadline and an output limit are required"
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self._lock = threading.Lock()
        self._pool: multiprocessing.pool.Pool | None = None

    def _ensure_pool(self) -> multiprocessing.pool.Pool:
        if self._pool is None:
            pool = multiprocessing.get_context("spawn").Pool(1, initializer=_child_init)
            try:  # warm up: the first real template must not pay the start-up
                pool.apply_async(_render, ("x", [], False, False, {}, 10)).get(
                    _STARTUP_TIMEOUT_S)
            except BaseException:
                pool.terminate()
                raise
            self._pool = pool
        return self._pool

    def render(self, template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
               continue_final_message: bool, kwargs: dict[str, Any]) -> str:
        """The rendered prompt text; TemplateError for anything the template did wrong,
        TemplateBusy if the renderer stayed taken for a whole deadline (so a queue of slow
        templates cannot hold every thread of the router's text pool for long)."""
        if not self._lock.acquire(timeout=self.timeout_s):
            raise TemplateBusy("client chat templates are rendering; retry later")
        try:
            pool = self._ensure_pool()
            res = pool.apply_async(_render, (template, messages, add_generation_prompt,
                                             continue_final_message, kwargs, self.max_chars))
            try:
                return str(res.get(self.timeout_s))
            except multiprocessing.TimeoutError:
                self._kill()
                raise TemplateError(f"the chat_template did not finish within "
                                    f"{self.timeout_s:g}s") from None
            except TemplateError:
                raise
            except Exception as e:  # e.g. an argument that does not pickle
                raise TemplateError(f"{type(e).__name__}: {e}") from None
        finally:
            self._lock.release()

    def _kill(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def close(self) -> None:
        with self._lock:
            self._kill()
