"""``ProgramState``: the growing text of one program run, its named results, and its forks."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from radixrt.lang.backends import Backend, GenParams
from radixrt.lang.ops import Content, Expr


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

    @contextmanager
    def _block(self, role: str) -> Iterator[ProgramState]:
        self._begin_role(role)
        yield self
        self._end_role(role)

    def system(self) -> Any:
        """``with s.system(): s += ...``"""
        return self._block("system")

    def user(self) -> Any:
        return self._block("user")

    def assistant(self) -> Any:
        return self._block("assistant")

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

    def __contains__(self, name: str) -> bool:
        return name in self._vars

    def get_var(self, name: str) -> Any:
        return self[name]

    def set_var(self, name: str, value: Any) -> None:
        self._vars[name] = value

    def get_meta_info(self, name: str) -> dict[str, Any]:
        """Token counts of a ``gen`` (prompt, cached, completion) or scores of a ``select``."""
        return dict(self._meta[name])

    def usage(self) -> dict[str, int]:
        """Prompt and cached tokens summed over this state's ``gen`` calls."""
        gens = [m for m in self._meta.values() if "completion_tokens" in m]
        return {"prompt_tokens": sum(m["prompt_tokens"] for m in gens),
                "cached_tokens": sum(m["cached_tokens"] for m in gens),
                "completion_tokens": sum(m["completion_tokens"] for m in gens)}

    def __repr__(self) -> str:
        return f"ProgramState(text={self._text[-60:]!r}, vars={sorted(self._vars)})"

    # ---- fork --------------------------------------------------------------------------
    def fork(self, n: int = 1) -> ForkedStates:
        """``n`` copies sharing this state's text. The stem is sent to the cache once first,
        so every branch's requests reuse its pages instead of racing to compute it."""
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
        return ForkedStates([self._copy() for _ in range(n)], stem_tokens)

    def _copy(self) -> ProgramState:
        c = ProgramState(self.backend, self.defaults)
        c._text, c._vars = self._text, dict(self._vars)
        c._messages = [dict(m) for m in self._messages]
        return c

    # ---- streaming ---------------------------------------------------------------------
    def text_iter(self) -> Iterator[str]:
        """Pieces of text as the (``stream=True``) program produces them; raises its error."""
        if self._chunks is None:
            yield self._text
            return
        while (item := self._chunks.get()) is not _END:
            assert isinstance(item, str), "the stream carries text"
            yield item
        self.sync()

    def sync(self) -> ProgramState:
        """Wait for a streamed program to end; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self

    def _start(self, target: Any) -> None:
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
    def _append(self, text: str) -> None:
        if text:
            self._text += text
            if self._chunks is not None:
                self._chunks.put(text)

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
    their requests batch); ``forks[i]`` is one branch."""

    def __init__(self, states: list[ProgramState], stem_tokens: int | None = None) -> None:
        self._states = states
        self.stem_tokens = stem_tokens  # tokens of the shared stem, when it was pre-cached

    def __len__(self) -> int:
        return len(self._states)

    def __getitem__(self, i: int) -> ProgramState:  # type: ignore[override]
        return self._states[i]

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self._states)

    def __iadd__(self, other: Content) -> ForkedStates:
        if isinstance(other, str) or len(self._states) == 1:
            for s in self._states:
                s += other
            return self

        def add(s: ProgramState) -> None:
            s += other

        with ThreadPoolExecutor(len(self._states), thread_name_prefix="radixrt-fork") as ex:
            for f in [ex.submit(add, s) for s in self._states]:
                f.result()  # re-raises a branch's ProgramError
        return self

    def join(self, name: str) -> list[Any]:
        """Each branch's result ``name``."""
        return [s[name] for s in self._states]
