"""OpenAI tool calls: which syntax a model writes them in, the grammar that forces one, and the
parsers that turn generated text back into ``tool_calls`` (streamed: ``tool_stream``).

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
from radixrt.server.json_scan import ARG_KEYS, scan_call, skip, whole_call

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


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def arg_keys(fmt: str) -> tuple[str, ...]:
    """The arguments' key, in the order a format's parser looks for it."""
    return ARG_KEYS if fmt == "hermes" else ARG_KEYS[::-1]


def _call(name: str, args: str) -> dict[str, Any]:
    # ``arguments`` is the JSON text the model wrote (checked to be an object), as OpenAI
    # returns it; the streamed pieces are cut from the same characters, so they reassemble
    # to exactly this.
    return {"id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": args}}


_HERMES_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
START_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "<|python_tag|>"}


def parse(plan: ToolPlan, text: str) -> tuple[str, list[dict[str, Any]]]:
    """(content, tool_calls). Text that does not hold well-formed calls stays content; with
    ``parallel_tool_calls`` false only the first call is returned (OpenAI's "at most one")."""
    content, calls = _parse(plan, text)
    return content, calls if plan.parallel else calls[:1]


def _objects(body: str, pos: int, seps: str, prefer: tuple[str, ...]
             ) -> tuple[list[dict[str, Any]], int] | None:
    """Whole call objects from ``pos`` on, separated by ``seps``: (calls, where they end), or
    None if one is not a valid call."""
    calls: list[dict[str, Any]] = []
    while True:
        pos = skip(body, pos, seps)
        if pos >= len(body) or body[pos] != "{":
            return calls, pos
        s = scan_call(body, pos)
        call = whole_call(body, s, prefer)
        if call is None or s.end is None:
            return None
        calls.append(_call(*call))
        pos = s.end


def _parse(plan: ToolPlan, text: str) -> tuple[str, list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []
    prefer = arg_keys(plan.fmt)
    if plan.fmt == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        for m in _HERMES_RE.finditer(text, start):
            body = m.group(1)
            got = _objects(body, 0, "", prefer)
            if got is None or len(got[0]) != 1 or got[1] != len(body):
                return text, []
            calls.extend(got[0])
        return (text[:start].strip(), calls) if calls else (text, [])
    body = text.strip()
    if plan.fmt == "mistral":
        if not body.startswith("[TOOL_CALLS]"):
            return text, []
        pos = skip(body, len("[TOOL_CALLS]"))
        if pos >= len(body) or body[pos] != "[":
            return text, []
        got = _objects(body, pos + 1, " \t\r\n,", prefer)
        if got is None or not body.startswith("]", got[1]) or body[got[1] + 1:].strip():
            return text, []
    else:  # llama3: the message is the call(s), optionally after <|python_tag|>
        body = body.removeprefix("<|python_tag|>")
        if not body.startswith("{"):
            return text, []
        got = _objects(body, 0, " \t\r\n;,", prefer)
        if got is None or got[1] != len(body):
            return text, []
    calls = got[0]
    return ("", calls) if calls else (text, [])


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
