"""``@function`` programs: ``prog.run(**args)``, ``prog.run_batch([...])`` and streaming
(``prog.run(..., stream=True).text_iter()``), with SGLang's signatures; the default backend
(``set_default_backend``) and the backend-level calls ``flush_cache`` / ``get_server_info``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from radixrt.lang.backends import Backend
from radixrt.lang.params import GenParams
from radixrt.lang.state import ProgramError, ProgramState

MAX_AUTO_THREADS = 64
# Program-wide sampling defaults a run may set: SGLang's names, plus radixrt's seed.
RUN_SAMPLING = ("max_new_tokens", "min_new_tokens", "n", "stop", "stop_token_ids",
                "stop_regex", "temperature", "top_p",
                "top_k", "min_p", "frequency_penalty", "presence_penalty", "ignore_eos",
                "return_logprob", "logprob_start_len", "top_logprobs_num",
                "return_text_in_logprobs", "seed")


class GlobalConfig:
    """Process-wide settings (SGLang's ``sgl.global_config``): the default backend."""

    def __init__(self) -> None:
        self.default_backend: Backend | None = None


global_config = GlobalConfig()


def set_default_backend(backend: Backend) -> None:
    global_config.default_backend = backend


def _backend(backend: Backend | None) -> Backend:
    backend = backend or global_config.default_backend
    if backend is None:
        raise ProgramError("no backend: pass backend=... or call set_default_backend(...)")
    return backend


def flush_cache(backend: Backend | None = None) -> bool:
    """Empty the backend's prefix cache (the default backend's when none is given)."""
    return _backend(backend).flush_cache()


def get_server_info(backend: Backend | None = None) -> dict[str, Any]:
    return _backend(backend).get_server_info()


class Program:
    """A DSL program: a Python function whose first argument is the state ``s``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        params = list(inspect.signature(fn).parameters.values())
        if not params:
            raise TypeError(f"@function {fn.__name__} must take the state as its first argument")
        self.fn = fn
        self.arg_names = [p.name for p in params[1:]]
        self._required = sum(p.default is inspect.Parameter.empty for p in params[1:])
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)

    def run(self, *args: Any, backend: Backend | None = None, stream: bool = False,
            use_thread: bool = True, **kwargs: Any) -> ProgramState:
        """Run once (on the default backend unless ``backend`` is given). Sampling keywords
        (``max_new_tokens``, ``temperature``, ...) set the defaults of every ``gen`` in the
        program. With ``stream=True`` it returns at once; read ``state.text_iter()``.
        ``use_thread`` is SGLang's executor choice; radixrt always runs the program in the
        calling thread (a streamed one in its own), so both values give the same results."""
        defaults = _defaults(kwargs)
        state = ProgramState(_backend(backend), defaults, streaming=stream)

        def body() -> None:
            state.ret_value = self.fn(state, *args, **kwargs)

        if stream:
            state._start(body)
        else:
            body()
        return state

    def run_batch(self, batch_kwargs: Sequence[Any], *, backend: Backend | None = None,
                  num_threads: int | str = "auto", progress_bar: bool = False,
                  generator_style: bool = False, **sampling: Any) -> Any:
        """Run once per kwargs dict (or per list of positional values), concurrently: their
        requests batch and share prefixes. States come back in input order; the first failure
        is raised after all have ended. ``generator_style`` yields them one by one instead."""
        items = [self._as_kwargs(x) for x in batch_kwargs]
        defaults = _defaults(sampling)
        if sampling:
            raise TypeError(f"run_batch got unknown keyword(s): {sorted(sampling)}")
        be = _backend(backend)
        if num_threads == "auto":
            threads = max(1, min(len(items), MAX_AUTO_THREADS))
        elif isinstance(num_threads, int) and num_threads >= 1:
            threads = num_threads
        else:
            raise ValueError(f"num_threads must be 'auto' or an int >= 1, got {num_threads!r}")

        def one(kw: dict[str, Any]) -> ProgramState:
            state = ProgramState(be, defaults)
            state.ret_value = self.fn(state, **kw)
            return state

        if generator_style:
            return self._yield(one, items, threads)
        return self._batch(one, items, threads, progress_bar) if items else []

    def _yield(self, one: Callable[[dict[str, Any]], ProgramState], items: list[dict[str, Any]],
               threads: int) -> Iterator[ProgramState]:
        with ThreadPoolExecutor(threads, thread_name_prefix="radixrt-batch") as ex:
            futures = [ex.submit(one, kw) for kw in items]
            for i, f in enumerate(futures):
                err = f.exception()
                if err is not None:
                    raise ProgramError(f"program {i} of {len(items)} failed: {err}") from err
                yield f.result()

    def _batch(self, one: Callable[[dict[str, Any]], ProgramState], items: list[dict[str, Any]],
               threads: int, progress_bar: bool) -> list[ProgramState]:
        with ThreadPoolExecutor(threads, thread_name_prefix="radixrt-batch") as ex:
            futures = [ex.submit(one, kw) for kw in items]
            bar = tqdm(total=len(items), disable=not progress_bar, desc=self.fn.__name__)
            for f in futures:
                f.exception()
                bar.update(1)
            bar.close()
        for i, f in enumerate(futures):
            err = f.exception()
            if err is not None:
                raise ProgramError(f"program {i} of {len(items)} failed: {err}") from err
        return [f.result() for f in futures]

    def _as_kwargs(self, x: Any) -> dict[str, Any]:
        if isinstance(x, dict):
            return x
        if isinstance(x, (list, tuple)) and self._required <= len(x) <= len(self.arg_names):
            return dict(zip(self.arg_names, x))
        raise TypeError(f"run_batch items must be dicts of arguments or lists of "
                        f"{self._required}..{len(self.arg_names)} values, got {x!r}")

    def bind(self, **kwargs: Any) -> Program:
        """A copy of the program with some arguments fixed."""
        unknown = set(kwargs) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.fn.__name__} has no argument(s) {sorted(unknown)}")
        return Program(functools.partial(self.fn, **kwargs))

    def trace(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("Program.trace is not supported by radixrt (programs run "
                                  "eagerly; fork caches a shared stem instead)")

    def cache(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("Program.cache (prefix tracing) is not supported by radixrt")


def function(func: Callable[..., Any] | None = None, num_api_spec_tokens: int | None = None,
             ) -> Any:
    """Decorator: ``@function def qa(s, question): s += user(question); ...``; also usable as
    ``@function()``."""
    if num_api_spec_tokens is not None:
        raise ValueError("function(num_api_spec_tokens=...) (API speculative execution) is "
                         "not supported by radixrt")
    if func is not None:
        return Program(func)
    return Program


def _defaults(kwargs: dict[str, Any]) -> GenParams:
    """Pop the sampling keywords out of ``kwargs`` into the run's gen defaults."""
    popped = {k: kwargs.pop(k) for k in RUN_SAMPLING if k in kwargs}
    given = {k: v for k, v in popped.items() if v is not None}
    if "max_new_tokens" in given:
        given["max_tokens"] = given.pop("max_new_tokens")
    if "min_new_tokens" in given:
        given["min_tokens"] = given.pop("min_new_tokens")
    for k in ("stop", "stop_regex"):
        if k in given:
            given[k] = (given[k],) if isinstance(given[k], str) else tuple(given[k])
    if "stop_token_ids" in given:
        given["stop_token_ids"] = tuple(given["stop_token_ids"])
    return dataclasses.replace(GenParams(), **given)
