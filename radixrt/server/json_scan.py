"""Where the parts of a tool-call JSON object lie in generated text, complete or still growing.

``scan_call`` walks one object ``{"name": .., "arguments": {..}}`` from its opening brace and
reports what is known so far: the name once its string has closed, where the arguments value
starts, and where it and the object end once they have closed. The streaming parser uses it on
a prefix (to send the name and argument text as they are generated); the final parser on the
whole text, so both cut the same argument text out of the same characters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_WS = " \t\r\n"
ARG_KEYS = ("arguments", "parameters")


@dataclass
class CallScan:
    start: int
    name: str | None = None
    # Per argument key: (start, end); end None while the value is still open.
    args: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None  # one past the closing brace, once closed
    ok: bool = True  # False: not a call object (what has come so far cannot be one)

    def args_span(self, prefer: tuple[str, ...]) -> tuple[int, int | None] | None:
        return next((self.args[k] for k in prefer if k in self.args), None)


def skip(text: str, i: int, chars: str = _WS) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


# The characters a scan stops at; ordinary text in between is skipped at regex speed (the
# streaming parser rescans the open call on every piece, so this keeps long arguments cheap).
_STRING_STOPS = re.compile(r'["\\]')
_VALUE_STOPS = re.compile(r'["{}\[\]]')


def string_end(text: str, i: int) -> int | None:
    """One past the closing quote of the JSON string starting at ``text[i] == '"'``."""
    j = i + 1
    while True:
        m = _STRING_STOPS.search(text, j)
        if m is None:
            return None
        if m.group() == '"':
            return m.end()
        j = m.end() + 1  # the escaped character


def value_end(text: str, i: int) -> int | None:
    """One past the JSON value starting at ``i``; None while it may still be growing. Only
    its extent is found here (strings and brackets); whether it is valid JSON is json's job."""
    c = text[i]
    if c == '"':
        return string_end(text, i)
    if c in "{[":
        depth, j = 0, i
        while True:
            m = _VALUE_STOPS.search(text, j)
            if m is None:
                return None
            c = m.group()
            if c == '"':
                e = string_end(text, m.start())
                if e is None:
                    return None
                j = e
                continue
            depth += 1 if c in "{[" else -1
            j = m.end()
            if depth == 0:
                return j
    j = i
    while j < len(text) and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(text) else None  # a number at the end may have more digits


def scan_call(text: str, i: int) -> CallScan:
    """What is known of the call object whose ``{`` is at ``text[i]``."""
    s = CallScan(i)
    if text[i] != "{":
        s.ok = False
        return s
    j = skip(text, i + 1)
    while j < len(text):
        if text[j] == "}":
            s.end = j + 1
            return s
        if text[j] != '"':
            break
        ke = string_end(text, j)
        if ke is None:
            return s
        key = json.loads(text[j:ke])
        j = skip(text, ke)
        if j >= len(text):
            return s
        if text[j] != ":":
            break
        j = skip(text, j + 1)
        if j >= len(text):
            return s
        ve = value_end(text, j)
        if key == "name" and text[j] == '"' and ve is not None:
            name = json.loads(text[j:ve])
            s.name = name if isinstance(name, str) else None
        if key in ARG_KEYS:
            s.args[key] = (j, ve)
        if ve is None:
            return s
        j = skip(text, ve)
        if j >= len(text):
            return s
        if text[j] == ",":
            j = skip(text, j + 1)
        elif text[j] != "}":
            break
    else:
        return s
    s.ok = False
    return s


def whole_call(text: str, s: CallScan, prefer: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, argument text) of a closed call object, or None if it is not a valid call:
    valid JSON, a string name, an object for arguments (the text the model wrote for them)."""
    span = s.args_span(prefer)
    if not s.ok or s.end is None or s.name is None or span is None or span[1] is None:
        return None
    try:
        obj = json.loads(text[s.start:s.end])
        args = json.loads(text[span[0]:span[1]])
    except ValueError:
        return None
    key = next(k for k in prefer if k in s.args)
    if not isinstance(obj, dict) or obj.get("name") != s.name or not isinstance(args, dict) \
            or obj.get(key) != args:
        return None
    return s.name, text[span[0]:span[1]]
