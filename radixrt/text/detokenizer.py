"""Incremental detokenization with stop strings, for streaming generated tokens as text.

Two stages, each holding back a little text:

1. ``_TokenText`` turns token ids into *final* text. Decoding one token alone is wrong twice
   over: byte-level BPE may split one UTF-8 character across tokens (decodes to U+FFFD until
   the rest arrives), and SentencePiece-style decoders drop a word's leading space when it is
   the first token decoded. So we decode a short window of already-emitted tokens plus the new
   ones and emit only the difference::

       ids        t0 t1 t2 t3 t4 | t5 t6        (t5 t6 just added)
                        ^prefix   ^read
       prefix_text = decode(ids[prefix:read])   already emitted
       new_text    = decode(ids[prefix:])       emit new_text[len(prefix_text):]

   When new_text ends with U+FFFD the character is incomplete: emit nothing, keep the offsets,
   and retry with the next token. Each step decodes O(window) tokens, never the whole output.

2. ``StopMatcher`` scans that final text for stop strings. Text that could be the start of a
   stop string is held back until it either completes the stop (cut there, never emitted) or
   diverges (released).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

_REPLACEMENT = "\ufffd"
# Prompt tokens to seed the window with: enough for a decoder to see the preceding word.
_CONTEXT_TOKENS = 5


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer we use."""

    def decode(self, token_ids: Any, **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class DetokStep:
    text: str  # newly final text, safe to send to the client
    stopped: bool  # a stop string completed; no more text will come
    matched_stop: str | None  # which stop string, when stopped


class _TokenText:
    """Stage 1: token ids -> final text via the prefix/read offset window."""

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool, context_ids: Sequence[int]
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(context_ids[-_CONTEXT_TOKENS:])
        # Context tokens count as already emitted: their text is only there for the diff.
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        # Cleanup of tokenization spaces is not prefix-stable (" ." -> "."), so it would break
        # the diff; streaming clients get the raw decode.
        return self._tok.decode(
            ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False
        )

    def add(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is held, U+FFFD included: the output ended, nothing will complete it."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        # Too short: only skipped special tokens so far. Trailing U+FFFD: a character is split.
        if len(new_text) <= len(prefix_text) or (not final and new_text.endswith(_REPLACEMENT)):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Stage 2: cuts text at the first completed stop string, holding back possible starts.

    When one chunk completes several stops, the one that completes first (smallest end index)
    wins, ties going to the one starting earlier: that is where token-by-token generation would
    have halted.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        assert all(stop), "stop strings must be non-empty"
        self._stop = tuple(stop)
        self._held = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str) -> str:
        """Returns the text that is now safe to emit."""
        if self.stopped:
            return ""
        buf = self._held + text
        if not self._stop:
            return buf
        # _held never contains a whole stop string, so any match ends inside `text` and a
        # scan of `buf` (at most max_stop_len - 1 + len(text) chars) sees all of them.
        best: tuple[int, int, str] | None = None
        for s in self._stop:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            _, start, s = best
            self.matched = s
            self._held = ""
            return buf[:start]
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """A held partial match never completed, so it is ordinary text."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = max(len(s) for s in self._stop) - 1
        for k in range(min(longest, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0


class IncrementalDetokenizer:
    """Streams the text of one generated sequence.

    ``context_token_ids``: optionally the last prompt tokens, so the first generated word keeps
    the leading space a SentencePiece decoder would strip at the start of a text.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
        *,
        context_token_ids: Sequence[int] = (),
    ) -> None:
        self._text = _TokenText(tokenizer, skip_special_tokens, context_token_ids)
        self._stop = StopMatcher(stop)
        self._pieces: list[str] = []

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    @property
    def full_text(self) -> str:
        """All text emitted so far (after flush(): the whole output, cut at a stop string)."""
        if len(self._pieces) > 1:  # join once, keep it joined
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add(self, token_ids: Sequence[int]) -> DetokStep:
        if self._stop.stopped:  # tokens after a stop (e.g. the rest of a batch) are dropped
            return DetokStep("", True, self._stop.matched)
        out = self._stop.feed(self._text.add(token_ids))
        if out:
            self._pieces.append(out)
        return DetokStep(out, self._stop.stopped, self._stop.matched)

    def flush(self) -> str:
        """Call once at the end of the sequence: releases every held-back character."""
        if self._stop.stopped:
            return ""
        out = self._stop.feed(self._text.flush())
        out += self._stop.flush()
        if out:
            self._pieces.append(out)
        return out
