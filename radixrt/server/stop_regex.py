"""``stop_regex``: end a sample once its text matches a pattern (SGLang's semantics: the text
is kept whole, up to the token that completed the match; finish_reason names the pattern).

Matched where the text is made (the router, or the in-process Engine), on the newest
``WINDOW`` characters after each step. The patterns are the client's, so they run under the
``regex`` package's timeout: a pattern that backtracks for longer than ``TIMEOUT_S`` on that
window ends its request with a 400 instead of stalling the router's event loop.
"""

from __future__ import annotations

from typing import Any

# How much recent text a match may span (SGLang bounds it by the pattern; a longer unbounded
# match that began earlier is missed).
WINDOW = 4096
TIMEOUT_S = 0.02
MAX_PATTERNS = 16
MAX_PATTERN_LEN = 1024


class StopRegexTimeout(ValueError):
    """A pattern took longer than TIMEOUT_S on one window."""


def _regex() -> Any:
    import regex  # a transformers dependency; stdlib re has no timeout

    return regex


def check_patterns(patterns: tuple[str, ...]) -> None:
    """ValueError (naming stop_regex) for a pattern that does not compile or is too large."""
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"stop_regex takes at most {MAX_PATTERNS} patterns, got {len(patterns)}")
    for p in patterns:
        if not isinstance(p, str) or not p or len(p) > MAX_PATTERN_LEN:
            raise ValueError(f"stop_regex patterns must be non-empty strings of at most "
                             f"{MAX_PATTERN_LEN} characters, got {p!r:.80}")
        try:
            _regex().compile(p)
        except Exception as e:  # regex.error, and whatever the compiler raises on odd input
            raise ValueError(f"stop_regex {p!r:.80} is not a valid regex: {e}") from None


class StopRegexMatcher:
    def __init__(self, patterns: tuple[str, ...]) -> None:
        rx = _regex()
        self._compiled = [(p, rx.compile(p)) for p in patterns]
        self._tail = ""

    def feed(self, text: str) -> str | None:
        """Add newly emitted text; the first pattern that now matches, or None."""
        if not text:
            return None
        self._tail = (self._tail + text)[-WINDOW:]
        for pattern, compiled in self._compiled:
            try:
                if compiled.search(self._tail, timeout=TIMEOUT_S) is not None:
                    return pattern
            except TimeoutError:
                raise StopRegexTimeout(f"stop_regex {pattern!r:.80} took over "
                                       f"{TIMEOUT_S * 1000:.0f} ms to match; simplify it") from None
        return None
