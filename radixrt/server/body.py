"""Request bodies before they are trusted: size limit while reading, nesting depth without
recursion, and JSON decode errors explained (NaN/Infinity, lone surrogates) naming the field.

Everything here is linear-time C work (regex, bytes.translate) except the error paths, and the
decode itself runs in the router's text pool, off the event loop.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import numpy as np
from starlette.requests import Request

from radixrt.server.errors import APIError, bad_request

# Byte -> nesting step: +1 for [ and {, -1 for ] and }, 0 for everything else.
_STEPS = np.zeros(256, dtype=np.int8)
_STEPS[[ord("["), ord("{")]] = 1
_STEPS[[ord("]"), ord("}")]] = -1
_KEY = re.compile(rb'"([A-Za-z_][A-Za-z0-9_]*)"\s*:')
_NON_FINITE = re.compile(rb'"([A-Za-z_][A-Za-z0-9_]*)"\s*:\s*(-?(?:NaN|Infinity))')
_HEX = rb"[0-9a-fA-F]{2}"
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB]" + _HEX + rb"(?!\\u[dD][c-fC-F]" + _HEX + rb")"
    rb"|(?<!\\u[dD][89abAB]" + _HEX + rb")\\u[dD][c-fC-F]" + _HEX)
_BYTE_POS = re.compile(r"\(byte (\d+)\)")
# Past this much, a too-large body is not drained any more (the connection then closes).
_DRAIN_FACTOR = 8


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than this server's limit of {limit} bytes",
                    None, "invalid_request_error")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 once more than ``limit`` bytes arrive (or are announced).

    A too-large body is still read to its end (up to a bound) and thrown away, so the client
    gets the 413 on a connection that stays usable instead of a reset mid-upload."""
    declared = request.headers.get("content-length")
    over = declared is not None and declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            over = True
        if over:
            chunks.clear()
            if size > limit * _DRAIN_FACTOR:
                break
        else:
            chunks.append(chunk)
    if over:
        raise too_large(limit)
    return b"".join(chunks)


def check_depth(raw: bytes, limit: int) -> None:
    """400 if ``raw`` nests deeper than ``limit`` (or closes more brackets than it opened).

    The depth is a running sum, +1 per ``[``/``{`` and -1 per ``]``/``}``, over the brackets
    outside strings. Escapes go first: ``\\\\`` pairs, then ``\\"`` (in valid JSON backslashes
    only occur in strings, so dropping them moves no structure); every quote left then toggles
    in/out of a string. All of it is bytes.replace / numpy over the body, no recursion and no
    per-character Python: 100,000 levels or 4 MB of ``[]`` cost milliseconds, never a
    RecursionError. Mismatched pairs such as ``[}`` are the parser's to find: within the depth
    limit it cannot recurse far."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # too few openings to nest deeper
        return
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    a = np.frombuffer(text, dtype=np.uint8)
    in_string = (np.cumsum(a == ord('"'), dtype=np.int32) & 1).astype(bool)
    steps = _STEPS[a]
    steps[in_string] = 0
    depth = np.cumsum(steps, dtype=np.int32)
    if int(depth.max()) > limit:
        raise bad_request(f"Request JSON nests deeper than this server's limit of {limit} "
                          "levels")
    if int(depth.min()) < 0:
        raise bad_request("Malformed JSON in request body: a bracket closes more than was "
                          "opened")


def _key_before(raw: bytes, pos: int) -> str | None:
    """The nearest object key before byte ``pos`` (to name the field an error is in)."""
    keys = list(_KEY.finditer(raw, 0, pos))
    return keys[-1].group(1).decode() if keys else None


def explain_decode_error(raw: bytes, err: msgspec.DecodeError) -> APIError:
    """msgspec's decode error as a 400 that names the field where we can tell."""
    nf = _NON_FINITE.search(raw)
    if nf is not None:
        field = nf.group(1).decode()
        return bad_request(f"{field} must be a finite number; {nf.group(2).decode()} is not "
                           "valid JSON", field)
    ls = _LONE_SURROGATE.search(raw)
    if ls is not None:
        field = _key_before(raw, ls.start())
        return bad_request(f"{field or 'The body'} contains a lone UTF-16 surrogate "
                           f"({ls.group().decode()}), which is not valid Unicode", field)
    msg = str(err)
    m = _BYTE_POS.search(msg)
    field = _key_before(raw, int(m.group(1))) if m else None
    return bad_request(f"Malformed JSON in request body: {msg}", field)


def decode(raw: bytes, schema: type[Any], max_depth: int) -> Any:
    """Decode ``raw`` into ``schema``: depth first, then msgspec; every failure is a 400."""
    if not raw.strip():
        raise bad_request("Request body is empty; expected a JSON object")
    check_depth(raw, max_depth)
    try:
        return msgspec.json.decode(raw, type=schema)
    except msgspec.ValidationError as e:
        msg = str(e)
        path = re.search(r"`\$\.([A-Za-z_]+)", msg)
        named = re.search(r"(?:missing required|unknown) field `([^`]+)`", msg)
        param = named.group(1) if named else (path.group(1) if path else None)
        if msg.startswith("Object contains unknown field"):
            msg += " (unsupported parameters are refused rather than ignored)"
        raise bad_request(f"Invalid request: {msg}", param) from None
    except msgspec.DecodeError as e:
        raise explain_decode_error(raw, e) from None
    except RecursionError:  # unreachable after check_depth; never let it become a 500
        raise bad_request(f"Request JSON nests deeper than {max_depth} levels") from None
