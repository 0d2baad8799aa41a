"""Streaming tool calls (``delta.tool_calls``) as the text is generated, as SGLang and vLLM
send them: content passes through until a call may have begun; then each call's header
(index, id, type, function.name) goes out as soon as its name is complete, and its argument
text in pieces as it grows. At the end the held text is parsed as a whole (``tool_calls.parse``,
the non-streamed parser, which cuts the same argument text out of the same characters), so the
pieces reassemble to the non-streamed calls; what the stream has not sent yet goes out then.

Known limit (shared with SGLang and vLLM): text that looked like a call while streaming but
does not parse at the end (free "auto" output that breaks off, or a call cut by max_tokens)
goes out as content at the end, after the call deltas already sent. Forced calls
(tool_choice required / named) always parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from radixrt.server.json_scan import CallScan, scan_call, skip
from radixrt.server.tool_calls import START_MARKERS, ToolPlan, arg_keys, new_call_id, parse


@dataclass
class _Sent:
    id: str
    name: str
    args: str = ""  # argument text sent so far


class StreamParser:
    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text already sent as content
        self.holding = False  # a call may have begun at text[sent]: no more content
        self.called = False  # the calls parsed at the end (finish_reason "tool_calls")
        self._calls: list[_Sent] = []
        self._limit = None if plan.parallel else 1  # parse() keeps only the first otherwise

    def feed(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        """(content that can go out now, tool-call deltas)."""
        self.text += piece
        content = "" if self.holding else self._content()
        return content, self._advance() if self.holding else []

    def _content(self) -> str:
        marker = START_MARKERS[self.plan.fmt]
        rest = self.text[self.sent:]
        at = rest.find(marker)
        if self.plan.fmt == "llama3" and not self.text[:self.sent].strip():
            stripped = rest.lstrip()
            if stripped.startswith("{") or marker.startswith(stripped[:len(marker)]) and stripped:
                at = len(rest) - len(stripped)
        if at >= 0:
            self.holding = True
            out, self.sent = rest[:at], self.sent + at
            return out
        # Hold back a tail that could be the start of the marker.
        keep = next((k for k in range(min(len(marker) - 1, len(rest)), 0, -1)
                     if marker.startswith(rest[-k:])), 0)
        if self.plan.fmt == "llama3" and not self.text.strip():
            keep = len(rest)  # nothing but whitespace yet: a call may still start
        out = rest[:len(rest) - keep]
        self.sent += len(out)
        return out

    def _objects(self, r: str) -> list[CallScan]:
        """The call objects begun so far in the held text ``r``, in order; the last may be
        open. Stops at anything the format does not allow between calls."""
        fmt, out = self.plan.fmt, list[CallScan]()
        pos = skip(r, 0)
        if fmt == "mistral":
            if not r.startswith("[TOOL_CALLS]", pos):
                return out
            pos = skip(r, pos + len("[TOOL_CALLS]"))
            if pos >= len(r) or r[pos] != "[":
                return out
            pos += 1
        elif fmt == "llama3" and r.startswith("<|python_tag|>", pos):
            pos += len("<|python_tag|>")
        while True:
            if fmt == "hermes":
                at = r.find("<tool_call>", pos)
                if at < 0:
                    return out
                pos = skip(r, at + len("<tool_call>"))
            else:
                pos = skip(r, pos, " \t\r\n;," if fmt == "llama3" else " \t\r\n,")
            if pos >= len(r) or r[pos] != "{":
                return out
            s = scan_call(r, pos)
            if not s.ok:
                return out
            out.append(s)
            if s.end is None:
                return out
            pos = s.end

    def _advance(self) -> list[dict[str, Any]]:
        r = self.text[self.sent:]
        deltas: dict[int, dict[str, Any]] = {}
        for k, s in enumerate(self._objects(r)):
            if self._limit is not None and k >= self._limit:
                break
            if k == len(self._calls):
                if s.name is None:
                    break  # the header waits for the whole name
                sent = _Sent(new_call_id(), s.name)
                self._calls.append(sent)
                deltas[k] = {"index": k, "id": sent.id, "type": "function",
                             "function": {"name": s.name, "arguments": ""}}
            sent = self._calls[k]
            span = s.args_span(arg_keys(self.plan.fmt))
            if span is None or r[span[0]] != "{":
                continue
            new = r[span[0] + len(sent.args):span[1] if span[1] is not None else len(r)]
            if new:
                sent.args += new
                d = deltas.setdefault(k, {"index": k, "function": {"arguments": ""}})
                d["function"]["arguments"] += new
        return [deltas[k] for k in sorted(deltas)]

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still to send, the tool-call deltas not sent yet)."""
        rest = self.text[self.sent:]
        if not self.holding:
            return rest, []
        content, calls = parse(self.plan, rest)
        if not calls:
            return rest, []
        self.called = True
        deltas: list[dict[str, Any]] = []
        for k, c in enumerate(calls):
            f = c["function"]
            if k < len(self._calls):
                sent = self._calls[k]
                if sent.name != f["name"] or not f["arguments"].startswith(sent.args):
                    continue  # cannot happen (one scanner cuts both); nothing would mend it
                tail = f["arguments"][len(sent.args):]
                if tail:
                    deltas.append({"index": k, "function": {"arguments": tail}})
            else:
                deltas.append({"index": k, **c})
        return content, deltas
