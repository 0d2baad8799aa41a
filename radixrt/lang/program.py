"""``@function`` programs: ``prog.run(**args, backend=...)``, ``prog.run_batch([...])`` and
streaming (``prog.run(..., stream=True).text_iter()``)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from radixrt.lang.backends import Backend, GenParams
from radixrt.lang.state import ProgramError, ProgramState

MAX_AUTO_THREADS = 64


class Program:
    """A DSL program: a Python function whose first argument is the state ``s``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        params = list(inspect.signature(fn).parameters)
        if not params:
            raise TypeError(f"@function {fn.__name__} must take the state as its first argument")
        self.fn = fn
        self.arg_names = params[1:]
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)

    def run(self, *args: Any, backend: Backend, stream: bool = False,
            max_new_tokens: int | None = None, temperature: float | None = None,
            top_p: float | None = None, top_k: int | None = None,
            stop: str | Sequence[str] | None = None, seed: int | None = None,
            **kwargs: Any) -> ProgramState:
        """Run once. Sampling keywords set the defaults of every ``gen`` in the program.
        With ``stream=True`` it returns at once; read ``state.text_iter()``."""
        defaults = _defaults(max_new_tokens, temperature, top_p, top_k, stop, seed)
        state = ProgramState(backend, defaults, streaming=stream)

        def body() -> None:
            state.ret_value = self.fn(state, *args, **kwargs)

        if stream:
            state._start(body)
        else:
            body()
        return state

    def run_batch(self, batch_kwargs: Sequence[dict[str, Any]], *, backend: Backend,
                  num_threads: int | str = "auto", progress_bar: bool = False,
                  max_new_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None,
                  stop: str | Sequence[str] | None = None,
                  seed: int | None = None) -> list[ProgramState]:
        """Run once per kwargs dict, concurrently (their requests batch and share prefixes).
        States come back in input order; the first failure is raised after all have ended."""
        items = list(batch_kwargs)
        if not items:
            return []
        if num_threads == "auto":
            threads = min(len(items), MAX_AUTO_THREADS)
        elif isinstance(num_threads, int) and num_threads >= 1:
            threads = num_threads
        else:
            raise ValueError(f"num_threads must be 'auto' or an int >= 1, got {num_threads!r}")
        sampling: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature,
                    "top_p": top_p, "top_k": top_k, "stop": stop, "seed": seed}

        def one(kw: dict[str, Any]) -> ProgramState:
            return self.run(backend=backend, **sampling, **kw)

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


def function(fn: Callable[..., Any]) -> Program:
    """Decorator: ``@function def qa(s, question): s += user(question); s += assistant(gen("a"))``."""
    return Program(fn)


def _defaults(max_new_tokens: int | None, temperature: float | None, top_p: float | None,
              top_k: int | None, stop: str | Sequence[str] | None,
              seed: int | None) -> GenParams:
    given: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature,
                             "top_p": top_p, "top_k": top_k, "seed": seed,
                             "stop": None if stop is None else
                             ((stop,) if isinstance(stop, str) else tuple(stop))}
    return dataclasses.replace(GenParams(), **{k: v for k, v in given.items() if v is not None})
