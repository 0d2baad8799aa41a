"""The router's text pool: results and exceptions reach the awaiting handler, and a task still
running never holds up the process's exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from radixrt.server.text_pool import TextPool


def test_results_and_exceptions_through_run_in_executor() -> None:
    pool = TextPool(2)

    def fail() -> None:
        raise ValueError("bad body")

    async def go() -> list[int]:
        loop = asyncio.get_running_loop()
        with pytest.raises(ValueError, match="bad body"):
            await loop.run_in_executor(pool, fail)
        return list(await asyncio.gather(*(loop.run_in_executor(pool, pow, i, 2)
                                           for i in range(8))))

    assert asyncio.run(go()) == [i * i for i in range(8)]
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(pow, 2, 2)


def test_running_task_does_not_block_exit() -> None:
    # A ThreadPoolExecutor would join this 10-minute task at exit; the pool's daemon threads
    # let the interpreter go. The timeout only bounds a failure (exit blocked), it is not timed.
    code = ("import threading, time\n"
            "from radixrt.server.text_pool import TextPool\n"
            "started = threading.Event()\n"
            "def work():\n    started.set(); time.sleep(600)\n"
            "TextPool(1).submit(work)\nstarted.wait()\nprint('exiting', flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "exiting" in out.stdout, out.stderr
