"""Does xgrammar's batch accept slow down when several threads run it at once? (issue 14)

256 matchers inside the LONG schema's string, split over T threads (each makes one batch
accept per step for its share, ``batch.batch_accept`` as the fused path's fill threads do;
call 1 on the H200 measured xgrammar's wrapper, which reads the result element by element), 30 steps of
8+-letter tokens. Per T: wall per step, and each thread's CPU time summed: if the summed CPU grows
with T, the threads slow each other down (hyperthread siblings, shared cache lines). ``separate``
gives each thread its own compiled grammar (a shared one is what the engine uses).

    python bench/probe_accept_threads.py [--tokenizer DIR] [--threads 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import xgrammar as xgr  # noqa: E402
from bench_grammar import LONG, load_tokenizer  # noqa: E402

from radixrt.constrained.batch import batch_accept  # noqa: E402
from radixrt.constrained.grammar import tokenizer_info  # noqa: E402

BATCH, STEPS = 256, 30


def _accept_steps(matchers: list[xgr.GrammarMatcher], shard: int, start: threading.Barrier,
                  cpu: list[float], words: list[int]) -> None:
    """One thread's share: STEPS batch accepts, its CPU time into ``cpu[shard]`` (the
    tokens are listed before the clock starts: only the accepts hold the thread)."""
    steps = [[words[(shard + k * 7 + i) % len(words)] for i in range(len(matchers))]
             for k in range(STEPS)]
    start.wait()
    c0 = time.thread_time()
    for toks in steps:
        assert batch_accept(matchers, toks) is None  # the fill threads' call: all accepted
    cpu[shard] = time.thread_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--threads", default="1,2,4,8")
    a = ap.parse_args()
    tok = load_tokenizer(a.tokenizer)
    vocab = len(tok)
    comp = xgr.GrammarCompiler(tokenizer_info(tok, vocab), max_threads=1, cache_enabled=False)
    grammars = [comp.compile_json_schema(json.dumps(LONG)) for _ in range(8)]
    words = [i for i in range(vocab) if (s := tok.decode([i])).isalpha() and len(s) >= 8][:500]
    opening = tok.encode('{"text": "', add_special_tokens=False)

    for n in (int(x) for x in a.threads.split(",")):
        for separate in (False, True):
            matchers = [xgr.GrammarMatcher(grammars[(i % n) % 8 if separate else 0])
                        for i in range(BATCH)]
            for m in matchers:
                for t in opening:
                    assert m.accept_token(t)
            shards = [matchers[s::n] for s in range(n)]
            cpu = [0.0] * n
            start = threading.Barrier(n + 1)
            threads = [threading.Thread(target=_accept_steps, args=(shards[s], s, start, cpu,
                                                                     words))
                       for s in range(n)]
            for t in threads:
                t.start()
            start.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            wall = (time.perf_counter() - t0) / STEPS * 1e3
            print(f"accept threads={n} grammar={'per thread' if separate else 'shared':10s} "
                  f"wall {wall:.2f} ms/step, threads' cpu summed {sum(cpu) / STEPS * 1e3:.2f} "
                  f"ms/step ({BATCH} accepts)", flush=True)


if __name__ == "__main__":
    main()
