"""OpenAI tool calls: which syntax a model writes them in, the grammar that forces one, and the
parsers that turn generated text back into ``tool_calls``.

Formats, chosen from the model's chat template:

    hermes   (Qwen2.5 / Qwen3, and the fallback)  <tool_call>\\n{"name": .., "arguments": {..}}\\n</tool_call>
    llama3   (Llama 3.1+ JSON tool calling)       {"name": .., "parameters": {..}}   (";"-separated)
    mistral  ([TOOL_CALLS] in the template)       [TOOL_CALLS][{"name": .., "arguments": {..}}, ..]

A template that takes no ``tools`` (SmolLM2's, ChatML test models) gets them in a system
message written here, in the hermes format, which the parser then reads.

``tool_choice`` "required" or a named function turns into an EBNF grammar (xgrammar builds the
JSON-schema part) that admits only well-formed calls of the allowed tools whose arguments match
their schemas, so they always parse; "auto" leaves the text free and parses what comes.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from radixrt.server.errors import APIError, bad_request

FORMATS = ("hermes", "llama3", "mistral")
MAX_TOOLS = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolPlan:
    """What a request with ``tools`` does: the tools, which may be called, in what syntax."""

    tools: tuple[Tool, ...]
    choice: str  # "auto" | "required" | "none" | "named"
    named: str | None
    parallel: bool
    fmt: str
    native: bool  # the chat template renders the tools itself

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    @property
    def allowed(self) -> tuple[Tool, ...]:
        return tuple(t for t in self.tools if self.named is None or t.name == self.named)


def detect_format(template: str | None) -> tuple[str, bool]:
    """(format, whether the template renders ``tools`` itself)."""
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral", True
    if "<tool_call>" in t:
        return "hermes", True
    if "<|python_tag|>" in t or ("ipython" in t and "tools" in t):
        return "llama3", True
    return "hermes", False


def parse_tools(tools: Any) -> tuple[Tool, ...]:
    if not isinstance(tools, list) or not tools:
        raise bad_request("tools must be a non-empty list", "tools")
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"tools takes at most {MAX_TOOLS} entries, got {len(tools)}", "tools")
    out: list[Tool] = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(
                t.get("function"), dict):
            raise bad_request(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                              "{...}}; other tool types are not supported", "tools")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise bad_request(f"tools[{i}].function.name must match {_NAME_RE.pattern}", "tools")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object",
                              "tools")
        desc = f.get("description", "")
        if not isinstance(desc, str):
            raise bad_request(f"tools[{i}].function.description must be a string", "tools")
        if any(o.name == name for o in out):
            raise bad_request(f"tools has two functions named {name!r}", "tools")
        out.append(Tool(name, desc, params))
    return tuple(out)


def make_plan(tools: Any, tool_choice: Any, parallel: bool | None,
              template: str | None) -> ToolPlan | None:
    if tools is None:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    parsed = parse_tools(tools)
    named = None
    if tool_choice is None:
        choice = "auto"
    elif tool_choice in ("auto", "required", "none"):
        choice = tool_choice
    elif (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
          and isinstance(tool_choice.get("function"), dict)):
        named = tool_choice["function"].get("name")
        if not any(t.name == named for t in parsed):
            raise bad_request(f"tool_choice names {named!r}, which is not in tools",
                              "tool_choice")
        choice = "named"
    else:
        raise bad_request('tool_choice must be "auto", "required", "none" or {"type": '
                          '"function", "function": {"name": ...}}', "tool_choice")
    fmt, native = detect_format(template)
    return ToolPlan(parsed, choice, named, True if parallel is None else parallel, fmt, native)


# ---------------------------------------------------------------------------- prompt side


def system_prompt(plan: ToolPlan) -> str:
    """Tool definitions for a template that renders no ``tools`` (hermes wording of our own)."""
    defs = "\n".join(json.dumps(t.as_openai()) for t in plan.tools)
    return ("You can call functions. Their signatures, one JSON object per line:\n"
            f"<tools>\n{defs}\n</tools>\n"
            "To call one, answer with a JSON object holding its name and arguments inside "
            "<tool_call></tool_call> tags:\n<tool_call>\n"
            '{"name": "<function-name>", "arguments": {<arguments>}}\n</tool_call>')


def call_schema(plan: ToolPlan) -> dict[str, Any]:
    """JSON schema of one call object of an allowed tool."""
    key = "parameters" if plan.fmt == "llama3" else "arguments"
    cases = [{"type": "object", "properties": {"name": {"const": t.name}, key: t.parameters},
              "required": ["name", key], "additionalProperties": False}
             for t in plan.allowed]
    return cases[0] if len(cases) == 1 else {"anyOf": cases}


def _xgrammar(param: str) -> Any:
    try:
        import xgrammar as xgr

        from radixrt.constrained.grammar import json_schema_grammar
    except ImportError:
        raise APIError(400, "grammar-constrained output needs the xgrammar package, which this "
                       "server lacks", param) from None
    return xgr, json_schema_grammar


def _lit(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid EBNF string literal


def forced_grammar(plan: ToolPlan) -> str:
    """EBNF admitting one or (parallel) more calls of the allowed tools, nothing else."""
    xgr, json_schema_grammar = _xgrammar("tool_choice")
    try:
        obj = str(json_schema_grammar(json.dumps(call_schema(plan))))
    except Exception as e:
        raise bad_request(f"a tool's parameters are not a supported JSON schema: {e}",
                          "tools") from None
    many = plan.parallel and plan.choice != "named"
    if plan.fmt == "hermes":
        call = f'call ::= {_lit("<tool_call>" + chr(10))} root {_lit(chr(10) + "</tool_call>")}'
        top = 'calls ::= call (' + _lit("\n") + ' call)*' if many else "calls ::= call"
    elif plan.fmt == "llama3":
        call = "call ::= root"
        top = 'calls ::= call ("; " call)*' if many else "calls ::= call"
    else:
        call = "call ::= root"
        inner = 'call (", " call)*' if many else "call"
        top = f'calls ::= {_lit("[TOOL_CALLS][")} {inner} "]"'
    text = f"{obj}\n{top}\n{call}\n"
    # Re-printed, the grammar's root is named "root" again (what SamplingParams.ebnf expects).
    return str(xgr.Grammar.from_ebnf(text, root_rule_name="calls"))


# ---------------------------------------------------------------------------- output side


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(name: Any, args: Any) -> dict[str, Any] | None:
    if not isinstance(name, str) or not isinstance(args, dict):
        return None
    return {"id": _new_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _json_values(text: str) -> list[Any] | None:
    """Consecutive JSON values separated by whitespace, ';' or ','; None if anything else."""
    dec = json.JSONDecoder()
    out: list[Any] = []
    i = 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i >= len(text):
            return out
        try:
            v, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(v)


_HERMES_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_START = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "<|python_tag|>"}


def parse(plan: ToolPlan, text: str) -> tuple[str, list[dict[str, Any]]]:
    """(content, tool_calls). Text that does not hold well-formed calls stays content; with
    ``parallel_tool_calls`` false only the first call is returned (OpenAI's "at most one")."""
    content, calls = _parse(plan, text)
    return content, calls if plan.parallel else calls[:1]


def _parse(plan: ToolPlan, text: str) -> tuple[str, list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []
    if plan.fmt == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        for m in _HERMES_RE.finditer(text, start):
            vals = _json_values(m.group(1))
            if vals is None or len(vals) != 1 or not isinstance(vals[0], dict):
                return text, []
            c = _call(vals[0].get("name"), vals[0].get("arguments", vals[0].get("parameters")))
            if c is None:
                return text, []
            calls.append(c)
        return (text[:start].strip(), calls) if calls else (text, [])
    body = text.strip()
    if plan.fmt == "mistral":
        if not body.startswith("[TOOL_CALLS]"):
            return text, []
        vals = _json_values(body[len("[TOOL_CALLS]"):])
        if vals is None or len(vals) != 1 or not isinstance(vals[0], list):
            return text, []
        items = vals[0]
    else:  # llama3: the message is the call(s), optionally after <|python_tag|>
        body = body.removeprefix("<|python_tag|>")
        if not body.startswith("{"):
            return text, []
        items = _json_values(body) or []
    for v in items:
        if not isinstance(v, dict):
            return text, []
        c = _call(v.get("name"), v.get("parameters", v.get("arguments")))
        if c is None:
            return text, []
        calls.append(c)
    return ("", calls) if calls else (text, [])


class StreamParser:
    """Streaming: content passes through until a call may have begun; from there text is held
    and parsed at the end, where the calls go out as ``delta.tool_calls`` (or, if they do not
    parse, the held text goes out as content)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text already sent as content
        self.holding = False

    def feed(self, piece: str) -> str:
        """Content that can go out now."""
        self.text += piece
        if self.holding:
            return ""
        marker = _START[self.plan.fmt]
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

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still to send, tool calls)."""
        rest = self.text[self.sent:]
        if not self.holding:
            return rest, []
        content, calls = parse(self.plan, rest)
        return (content, calls) if calls else (rest, [])


def with_system_prompt(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    """Messages for a template that renders no tools: the tool prompt joins the system message,
    and earlier assistant calls are written back as the hermes text the model would have made."""
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if isinstance(calls, list) and calls:
            parts = [m["content"]] if m["content"] else []
            for c in calls:
                f = c.get("function", {}) if isinstance(c, dict) else {}
                args = f.get("arguments", "{}")
                try:
                    args_v = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    args_v = args
                body = json.dumps({"name": f.get("name"), "arguments": args_v})
                parts.append(f"<tool_call>\n{body}\n</tool_call>")
            m = {"role": "assistant", "content": "\n".join(parts)}
        out.append(m)
    prompt = system_prompt(plan)
    if out and out[0]["role"] == "system":
        return [{**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}, *out[1:]]
    return [{"role": "system", "content": prompt}, *out]
