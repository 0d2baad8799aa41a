"""Grammar texts -> xgrammar compiled grammars, cached per (kind, text).

Two halves:
- ``check_syntax`` (router, no tokenizer): parses the grammar so a bad regex / schema / EBNF is
  a 400 naming the field before anything reaches a worker.
- ``GrammarCompiler`` (worker): compiles against the model's tokenizer in a small thread pool
  and keeps the results in an LRU keyed by the grammar text, so a schema is compiled once per
  worker however many requests use it. A compilation that overruns ``timeout_s`` fails its
  request (its thread finishes in the background and the result is cached all the same).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import xgrammar as xgr

from radixrt.constrained.sequences import DEFAULT_COMPILE_TIMEOUT_S

GrammarKey = tuple[str, str]  # (kind, text): kind in radixrt.sampling_params.CONSTRAINT_FIELDS

DEFAULT_CACHE_ENTRIES = 256


class GrammarError(ValueError):
    """The grammar is invalid, unsupported, or did not compile in time (a client error)."""


# xgrammar 0.2.9's JSON string rules need two repairs before they admit only valid JSON:
# - length-bounded strings ({"maxLength": n}) use a class that admits control characters, so a
#   walk can emit "a\x17b", which strict JSON parsers (Python's json.loads) reject;
# - every negated class admits the UTF-16 surrogates U+D800..U+DFFF as 3-byte sequences, which
#   are not UTF-8 at all (they decode to U+FFFD, one per byte, breaking maxLength too).
_STRING_CLASS_FIXES = (
    (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\ud800-\udfff]'),
    (r'[^\0-\x1f\"\\\r\n]', r'[^\0-\x1f\"\\\r\n\ud800-\udfff]'),
)


def json_schema_grammar(text: str) -> xgr.Grammar:
    """A JSON schema's grammar: compact separators, no extra properties unless allowed, and
    strings that are valid JSON and valid UTF-8 (see above)."""
    ebnf = str(xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True))
    for loose, strict in _STRING_CLASS_FIXES:
        ebnf = ebnf.replace(loose, strict)
    return xgr.Grammar.from_ebnf(ebnf)


def _grammar(kind: str, text: str) -> xgr.Grammar:
    if kind == "regex":
        return xgr.Grammar.from_regex(text)
    if kind == "json_schema":
        return json_schema_grammar(text)
    if kind == "ebnf":
        return xgr.Grammar.from_ebnf(text)
    raise GrammarError(f"unknown grammar kind {kind!r}")


def _clean(e: Exception) -> str:
    # xgrammar prefixes its messages with "[time] /path/file.cc:line: "; keep the reason.
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg.split(": ", 1)[1] if msg.startswith("[") and ": " in msg else msg


def check_syntax(kind: str, text: str) -> None:
    """Raises GrammarError when ``text`` is not a valid grammar of ``kind``."""
    try:
        _grammar(kind, text)
    except GrammarError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own classes
        raise GrammarError(f"invalid {kind}: {_clean(e)}") from None


def tokenizer_info(tokenizer: Any, vocab_size: int,
                   stop_token_ids: list[int] | None = None) -> xgr.TokenizerInfo:
    """xgrammar's view of the tokenizer; ``vocab_size`` is the model's logits width (it may
    exceed the tokenizer's length: the padding ids are never allowed); ``stop_token_ids``: the
    tokens that may end a complete match (default: the tokenizer's eos)."""
    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                              stop_token_ids=stop_token_ids or None)


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer. Thread-safe."""

    def __init__(self, info: xgr.TokenizerInfo, *, max_entries: int = DEFAULT_CACHE_ENTRIES,
                 timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S, threads: int = 2) -> None:
        assert max_entries >= 1 and timeout_s > 0, "need a positive cache size and timeout"
        self.info = info
        self.vocab_size = info.vocab_size
        self.timeout_s = timeout_s
        # xgrammar's own cache is off: ours is keyed by the request's text and bounded by count.
        self._xgr = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarKey, Future[xgr.CompiledGrammar]] = OrderedDict()
        self._max = max_entries
        self._copies: OrderedDict[tuple[GrammarKey, int], xgr.CompiledGrammar] = OrderedDict()
        self._infos: dict[int, xgr.TokenizerInfo] = {}
        self.hits = 0
        self.misses = 0
        self.compile_s = 0.0  # total time spent compiling (cold compiles only)

    def _compile(self, key: GrammarKey) -> xgr.CompiledGrammar:
        kind, text = key
        t0 = time.perf_counter()
        try:
            if kind == "regex":
                out = self._xgr.compile_regex(text)
            elif kind == "json_schema":
                out = self._xgr.compile_grammar(json_schema_grammar(text))
            elif kind == "ebnf":
                out = self._xgr.compile_grammar(text)
            else:
                raise GrammarError(f"unknown grammar kind {kind!r}")
        except GrammarError:
            raise
        except Exception as e:
            raise GrammarError(f"invalid {kind}: {_clean(e)}") from None
        finally:
            self.compile_s += time.perf_counter() - t0
        return out

    def submit(self, key: GrammarKey) -> Future[xgr.CompiledGrammar]:
        """The (possibly finished) compilation of ``key``; starts it on a miss."""
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return fut
            self.misses += 1
            fut = self._pool.submit(self._compile, key)
            self._cache[key] = fut
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        # A failed compilation is not kept: the same text fails fast in check_syntax anyway,
        # and a timeout-only failure deserves a retry.
        fut.add_done_callback(lambda f: self._forget_failed(key, f))
        return fut

    def _forget_failed(self, key: GrammarKey, fut: Future[xgr.CompiledGrammar]) -> None:
        if fut.cancelled() or fut.exception() is None:
            return
        with self._lock:
            if self._cache.get(key) is fut:
                del self._cache[key]

    def compile(self, key: GrammarKey) -> xgr.CompiledGrammar:
        """Blocking compile (cached); GrammarError on a bad grammar or after ``timeout_s``."""
        fut = self.submit(key)
        try:
            return fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise GrammarError(f"{key[0]} did not compile within {self.timeout_s:g} s") from None

    def compile_copy(self, key: GrammarKey, copy: int) -> xgr.CompiledGrammar:
        """``compile``, as private copy number ``copy`` (0: the shared one): the copy and its
        tokenizer info are objects of their own, so matchers on different fill threads touch
        no common object (RADIXRT_GRAMMAR_SHARD_COPIES; each copy costs a serialize /
        deserialize once, ~5-30 ms, and each copy's tokenizer info ~70 ms once)."""
        shared = self.compile(key)
        if copy == 0:
            return shared
        with self._lock:
            got = self._copies.get((key, copy))
            if got is not None:
                self._copies.move_to_end((key, copy))
                return got
            info = self._infos.get(copy)
            if info is None:
                info = self._infos[copy] = xgr.TokenizerInfo.deserialize_json(
                    self.info.serialize_json())
            got = self._copies[(key, copy)] = xgr.CompiledGrammar.deserialize_json(
                shared.serialize_json(), info)
            while len(self._copies) > self._max * 4:
                self._copies.popitem(last=False)
            return got

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def json_object_schema() -> str:
    """response_format json_object: any JSON object."""
    return json.dumps({"type": "object"})
