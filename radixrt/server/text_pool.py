"""The router's text pool: a few daemon threads for body decoding, tokenization and templates.

Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so one 10 MB prompt still
being tokenized would hold up the router's shutdown for as long as it takes. Work here is pure
(bytes in, token ids or an error out) and owns nothing that needs cleaning up, so daemon threads
that die with the process are safe. Fast tokenizers release the GIL while they encode, so the
threads tokenize in parallel and the event loop keeps answering meanwhile.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class TextPool(Executor):
    def __init__(self, workers: int | None = None) -> None:
        n = workers or min(4, os.cpu_count() or 1)
        assert n >= 1, "a pool needs at least one thread"
        self._q: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...],
                                         dict[str, Any]] | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"radixrt-text-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._closed:
            raise RuntimeError("submit() after shutdown()")
        fut: Future[Any] = Future()
        self._q.put((fut, fn, args, kwargs))
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        for _ in self._threads:
            self._q.put(None)
        if wait:
            for t in self._threads:
                t.join()

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            fut, fn, args, kwargs = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the awaiting handler, which decides
                fut.set_exception(e)
