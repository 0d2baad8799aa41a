"""``ProgramState``: the growing text of one program run, its named results, and its forks."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from radixrt.lang.backends import Backend
from radixrt.lang.exprs import Content, Expr, Role
from radixrt.lang.params import GenParams


class ProgramError(RuntimeError):
    """A DSL call failed; the message names the call (``gen('answer') failed: ...``)."""


_END = object()  # end of a stream


class ProgramState:
    """``s += "text" | gen(...) | select(...) | user(...)``; ``s["name"]``; ``s.text()``."""

    def __init__(self, backend: Backend, defaults: GenParams | None = None,
                 streaming: bool = False) -> None:
        self.backend = backend
        self.defaults = defaults or GenParams()
        self.streaming = streaming
        self.ret_value: Any = None
        self._text = ""
        self._vars: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._messages: list[dict[str, str]] = []
        self._role: tuple[str, int] | None = None  # open role block: (role, content start)
        self._fork_start = 0  # where this branch's own text begins (0 unless forked)
        # Streamed pieces: (variable or None, text, the server's meta_info or None).
        self._chunks: queue.Queue[object] | None = queue.Queue() if streaming else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ---- building ----------------------------------------------------------------------
    def __iadd__(self, other: Content) -> ProgramState:
        if other is None:
            return self
        if isinstance(other, str):
            self._append(other)
        elif isinstance(other, Expr):
            try:
                other.apply(self)
            except ProgramError:
                raise
            except Exception as e:
                raise ProgramError(f"{other.describe()} failed: {e}") from e
        elif isinstance(other, (list, tuple)):
            for item in other:
                self += item
        else:
            raise TypeError(f"cannot add {type(other).__name__} to a program state (expected "
                            "str, gen(...), select(...), a role, or a list of them)")
        return self

    def _role_scope(self, role: str, content: Content) -> Any:
        if content is not None:  # s.user("hi") adds the whole message
            self += Role(role, content)
            return None
        return self._block(role)

    @contextmanager
    def _block(self, role: str) -> Iterator[ProgramState]:
        self._begin_role(role)
        yield self
        self._end_role(role)

    def system(self, content: Content = None) -> Any:
        """``with s.system(): s += ...`` (or ``s.system("text")``)."""
        return self._role_scope("system", content)

    def user(self, content: Content = None) -> Any:
        return self._role_scope("user", content)

    def assistant(self, content: Content = None) -> Any:
        return self._role_scope("assistant", content)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[ProgramState]:
        """``with s.var_scope("x"): s += ...``: ``s["x"]`` is the text added inside."""
        start = len(self._text)
        yield self
        self._vars[name] = self._text[start:]

    # ---- reading -----------------------------------------------------------------------
    def text(self) -> str:
        return self._text

    def messages(self) -> list[dict[str, str]]:
        """The role blocks so far as chat messages (text outside roles is not a message)."""
        return [dict(m) for m in self._messages]

    def __getitem__(self, name: str) -> Any:
        if name not in self._vars:
            raise KeyError(f"no result named {name!r} (have: {sorted(self._vars)})")
        return self._vars[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self._vars[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self._vars

    def get_var(self, name: str) -> Any:
        return self[name]

    def set_var(self, name: str, value: Any) -> None:
        self._vars[name] = value

    def get_meta_info(self, name: str) -> dict[str, Any]:
        """Token counts (and logprobs, when asked) of a ``gen``, or scores of a ``select``."""
        if name not in self._meta:
            raise KeyError(f"no gen or select named {name!r} (have: {sorted(self._meta)})")
        return dict(self._meta[name])

    def usage(self) -> dict[str, int]:
        """Prompt and cached tokens summed over this state's ``gen`` calls."""
        gens = [m for m in self._meta.values() if "completion_tokens" in m]
        return {"prompt_tokens": sum(m["prompt_tokens"] for m in gens),
                "cached_tokens": sum(m["cached_tokens"] for m in gens),
                "completion_tokens": sum(m["completion_tokens"] for m in gens)}

    def error(self) -> BaseException | None:
        """A streamed program's error, once it has ended (None if it succeeded)."""
        if self._thread is not None:
            self._thread.join()
        return self._error

    def __repr__(self) -> str:
        return f"ProgramState(text={self._text[-60:]!r}, vars={sorted(self._vars)})"

    # ---- fork --------------------------------------------------------------------------
    def fork(self, n: int = 1, position_ids_offset: Any = None) -> ForkedStates:
        """``n`` copies sharing this state's text. The stem is sent to the cache once first,
        so every branch's requests reuse its pages instead of racing to compute it."""
        if position_ids_offset is not None:
            raise ValueError("fork(position_ids_offset=...) is not supported by radixrt")
        n = int(n)
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}")
        if self._role is not None:
            raise ProgramError(f"fork inside an open {self._role[0]} block")
        stem_tokens = None
        if n > 1 and self._text:
            try:
                stem_tokens = self.backend.cache_prefix(self._text).prompt_tokens
            except Exception as e:
                raise ProgramError(f"fork({n}) failed caching the stem: {e}") from e
        return ForkedStates([self._copy() for _ in range(n)], stem_tokens, self)

    @contextmanager
    def copy(self) -> Iterator[ProgramState]:
        """``with s.copy() as c: c += ...``: a branch whose new variables join back into s."""
        forks = self.fork(1)
        try:
            yield forks[0]
        finally:
            forks.join()

    def _copy(self) -> ProgramState:
        c = ProgramState(self.backend, self.defaults)
        c._text, c._vars = self._text, dict(self._vars)
        c._messages = [dict(m) for m in self._messages]
        c._fork_start = len(self._text)
        return c

    # ---- streaming ---------------------------------------------------------------------
    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Pieces of text as the (``stream=True``) program produces them (only those of
        ``gen(var_name)`` when given); raises the program's error at the end."""
        if self._chunks is None:
            yield self._text if var_name is None else str(self[var_name])
            return
        for var, text, _ in self._stream_items():
            if var_name is None or var == var_name:
                yield text

    async def text_async_iter(self, var_name: str | None = None,
                              return_meta_data: bool = False) -> AsyncIterator[Any]:
        """``text_iter`` for asyncio; with ``return_meta_data`` it yields ``(text, meta)``,
        meta being the server's meta_info of that piece (None in process)."""
        if return_meta_data and var_name is None:
            raise ValueError("text_async_iter(return_meta_data=True) needs a var_name")
        items = self._stream_items() if self._chunks is not None else iter(
            [(var_name, self._text if var_name is None else str(self[var_name]),
              self._meta.get(var_name or ""))])
        loop = asyncio.get_running_loop()
        while (item := await loop.run_in_executor(None, next, items, None)) is not None:
            var, text, meta = item
            if var_name is None or var == var_name:
                yield (text, meta) if return_meta_data else text

    def _stream_items(self) -> Iterator[tuple[str | None, str, dict[str, Any] | None]]:
        assert self._chunks is not None, "streaming state"
        while (item := self._chunks.get()) is not _END:
            assert isinstance(item, tuple), "the stream carries (var, text, meta)"
            yield item
        self.sync()

    def sync(self) -> ProgramState:
        """Wait for a streamed program to end; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self

    def _start(self, target: Callable[[], None]) -> None:
        def main() -> None:
            try:
                target()
            except BaseException as e:  # handed to the reader, who re-raises it
                self._error = e
            finally:
                assert self._chunks is not None, "streaming state"
                self._chunks.put(_END)

        self._thread = threading.Thread(target=main, name="radixrt-program", daemon=True)
        self._thread.start()

    # ---- used by ops -------------------------------------------------------------------
    def resolve_params(self, overrides: dict[str, Any]) -> GenParams:
        return dataclasses.replace(self.defaults, **overrides)

    def backend_reasoning_parser(self) -> str | None:
        return self.backend.reasoning_parser()

    def _append(self, text: str, var: str | None = None,
                meta: dict[str, Any] | None = None) -> None:
        if text:
            self._text += text
            if self._chunks is not None:
                self._chunks.put((var, text, meta))

    def _stream_var_begin(self, name: str | None) -> None:
        if name is not None:
            self._vars[name] = ""

    def _replace_text(self, text: str) -> None:
        self._text = text

    def _record(self, name: str | None, value: Any, meta: dict[str, Any]) -> None:
        if name is not None:
            self._vars[name] = value
            self._meta[name] = meta

    def _begin_role(self, role: str) -> None:
        if self._role is not None:
            raise ProgramError(f"{role} block opened inside an open {self._role[0]} block")
        tmpl = self.backend.chat_template()
        if not self._messages and role != "system":
            self._append(tmpl.default_system)  # what the template adds to system-less chats
        self._append(tmpl.prefix[role])
        self._role = (role, len(self._text))

    def _end_role(self, role: str) -> None:
        if self._role is None or self._role[0] != role:
            open_ = self._role[0] if self._role else "no"
            raise ProgramError(f"{role}_end() but {open_} block is open")
        content = self._text[self._role[1]:]
        self._append(self.backend.chat_template().suffix[role])
        self._messages.append({"role": role, "content": content})
        self._role = None


class ForkedStates(Sequence[ProgramState]):
    """Branches of a fork. ``forks += expr`` runs ``expr`` on every branch concurrently (so
    their requests batch); ``forks += lambda i: ...`` or ``forks += [e0, e1, ...]`` gives each
    branch its own; ``forks[i]`` is one branch; ``forks.join()`` gathers them back."""

    def __init__(self, states: list[ProgramState], stem_tokens: int | None = None,
                 parent: ProgramState | None = None) -> None:
        self._states = states
        self.stem_tokens = stem_tokens  # tokens of the shared stem, when it was pre-cached
        self._parent = parent

    def __len__(self) -> int:
        return len(self._states)

    def __getitem__(self, i: int) -> ProgramState:  # type: ignore[override]
        return self._states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        # `forks[i] += x` assigns the (same) state back.
        if value is not self._states[i]:
            raise TypeError("a fork's branches cannot be replaced")

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self._states)

    def __iadd__(self, other: Any) -> ForkedStates:
        if callable(other) and not isinstance(other, Expr):
            per_branch = [other(i) for i in range(len(self._states))]
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self._states):
                raise ValueError(f"forks += a list needs one item per branch ({len(self)}), "
                                 f"got {len(other)}")
            per_branch = list(other)
        else:
            per_branch = [other] * len(self._states)
        if len(self._states) == 1 or all(isinstance(x, str) for x in per_branch):
            for s, x in zip(self._states, per_branch):
                s += x
            return self

        def add(s: ProgramState, x: Any) -> None:
            s += x

        with ThreadPoolExecutor(len(self._states), thread_name_prefix="radixrt-fork") as ex:
            for f in [ex.submit(add, s, x) for s, x in zip(self._states, per_branch)]:
                f.result()  # re-raises a branch's ProgramError
        return self

    def join(self, name: str | None = None, mode: str = "gather_variable") -> Any:
        """``join("x")``: each branch's result ``x``. ``join()``: every variable a branch
        made becomes, in the parent, the list of the branches' values. ``join(mode=
        "concate_and_append")``: the parent's text gets each branch's new text, in order."""
        if name is not None:
            return [s[name] for s in self._states]
        parent = self._parent
        if parent is None:
            raise ValueError("join() needs the forked state (use join(name))")
        if mode == "gather_variable":
            before = set(parent._vars)
            for s in self._states:
                for k, v in s._vars.items():
                    if k not in before:
                        parent._vars.setdefault(k, []).append(v)
                        if k in s._meta:
                            parent._meta.setdefault(k, {}).setdefault("branches", []).append(
                                s._meta[k])
        elif mode == "concate_and_append":
            for s in self._states:
                parent._append(s._text[s._fork_start:])
        else:
            raise ValueError(f"join mode must be 'gather_variable' or 'concate_and_append', "
                             f"got {mode!r}")
        return None
