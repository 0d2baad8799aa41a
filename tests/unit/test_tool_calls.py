"""Tool-call formats: detection from the chat template, parsing (whole and streamed), and the
forced grammar: every walk through it parses into calls whose arguments match the schema."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from radixrt.constrained.grammar import GrammarCompiler, tokenizer_info
from radixrt.constrained.matcher import Matcher
from radixrt.kernels.token_bitmask import apply_token_bitmask
from radixrt.server.errors import APIError
from radixrt.server.tool_calls import detect_format, forced_grammar, make_plan, parse
from radixrt.server.tool_stream import StreamParser
from tests.fixtures import json_schema_check as jsonschema
from tests.fixtures.tiny_models import EOS_ID, TINY_VOCAB, build_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "days": {"type": "integer", "minimum": 1,
                                                             "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "now", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


def plan(fmt_template: str, choice: Any = "auto", parallel: bool | None = None) -> Any:
    return make_plan([WEATHER, TIME], choice, parallel, fmt_template)


def test_format_detection() -> None:
    assert detect_format("{{ '<tool_call>' }}") == ("hermes", True)
    assert detect_format("[TOOL_CALLS]") == ("mistral", True)
    assert detect_format("<|python_tag|>") == ("llama3", True)
    assert detect_format("<|im_start|>") == ("hermes", False)


@pytest.mark.parametrize("fmt,text", [
    ("<tool_call>", 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
                    '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}'
                    "\n</tool_call>"),
    ("<|python_tag|>", '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}; '
                       '{"name": "now", "parameters": {}}'),
    ("[TOOL_CALLS]", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", '
                     '"days": 2}}, {"name": "now", "arguments": {}}]'),
])
def test_parse_each_format_whole_and_streamed(fmt: str, text: str) -> None:
    p = plan(fmt)
    content, calls = parse(p, text)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "days": 2}
    assert content == ("Sure." if fmt == "<tool_call>" else "")
    # Streamed in 3-character pieces: the content before the calls, then each call's header
    # as soon as its name is complete and its arguments in pieces, reassembling to the same.
    sent, got, early = stream(p, [text[i:i + 3] for i in range(0, len(text), 3)])
    assert sent.strip() == content
    assert got == [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    assert early["headers"] == 2 and early["arg_pieces"] > 4, early


def stream(p: Any, pieces: list[str]) -> tuple[str, list[tuple[str, str]], dict[str, int]]:
    """Feed ``pieces``: (content sent, reassembled (name, arguments) per index, how many
    headers and argument pieces came before the end)."""
    sp = StreamParser(p)
    content = ""
    slots: dict[int, dict[str, str]] = {}
    early = {"headers": 0, "arg_pieces": 0}

    def take(deltas: list[dict[str, Any]], before_end: bool) -> None:
        for d in deltas:
            slot = slots.setdefault(d["index"], {"name": "", "arguments": ""})
            if "id" in d:
                assert d["type"] == "function" and d["id"].startswith("call_") and not slot["name"]
                early["headers"] += before_end
            slot["name"] += d["function"].get("name", "")
            slot["arguments"] += d["function"].get("arguments", "")
            early["arg_pieces"] += before_end and bool(d["function"].get("arguments"))

    for piece in pieces:
        out, deltas = sp.feed(piece)
        content += out
        take(deltas, True)
    out, deltas = sp.finish()
    take(deltas, False)
    assert sp.called is bool(slots)
    return content + out, [(v["name"], v["arguments"]) for _, v in sorted(slots.items())], early


def test_streamed_calls_equal_whole_parse_piece_by_piece() -> None:
    """Every split of a call's text (one character at a time, whole, name before or after
    the arguments, nested and escaped argument values, a single call when not parallel)
    streams to the same calls as the whole parse."""
    args = '{"city": "O\\"s}lo", "deep": {"a": [1, {"b": "]"}]}, "days": 2}'
    texts = {
        "<tool_call>": f'Hi <tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n'
                       '</tool_call>\n<tool_call>\n{"arguments": {}, "name": "now"}\n</tool_call>',
        "<|python_tag|>": f'{{"name": "get_weather", "parameters": {args}}};{{"name": "now", '
                          '"parameters": {}}',
        "[TOOL_CALLS]": f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {args}}},'
                        '{"name": "now", "arguments": {}}]',
    }
    for fmt, text in texts.items():
        for parallel in (True, False):
            p = plan(fmt, parallel=parallel)
            content, calls = parse(p, text)
            want = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
            assert len(want) == (2 if parallel else 1) and json.loads(want[0][1])["days"] == 2
            for pieces in ([text], list(text)):
                sent, got, _ = stream(p, pieces)
                assert got == want and sent.strip() == content, (fmt, parallel, got)


def test_plain_text_stays_content() -> None:
    for fmt in ("<tool_call>", "<|python_tag|>", "[TOOL_CALLS]"):
        p = plan(fmt)
        assert parse(p, "No tools needed: it is 3 pm.") == ("No tools needed: it is 3 pm.", [])
        text = "Hello {there} <tool_call unfinished"
        sent, calls, _ = stream(p, list(text))
        assert sent == text and calls == []


def test_bad_tool_requests_are_400() -> None:
    for tools, choice, what in [([{"type": "retrieval"}], "auto", "tools"),
                                ([WEATHER], {"type": "function", "function": {"name": "x"}},
                                 "tool_choice"),
                                ([WEATHER], "sometimes", "tool_choice"),
                                (None, "required", "tool_choice"),
                                ([WEATHER, WEATHER], "auto", "tools")]:
        with pytest.raises(APIError) as e:
            make_plan(tools, choice, None, "")
        assert e.value.status == 400 and e.value.param == what


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler(tokenizer_info(build_tokenizer(), TINY_VOCAB), timeout_s=60)


@pytest.mark.parametrize("fmt", ["<tool_call>", "<|python_tag|>", "[TOOL_CALLS]"])
@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                  "function": {"name": "get_weather"}}])
def test_forced_grammar_always_parses(compiler: GrammarCompiler, fmt: str, choice: Any) -> None:
    tok = build_tokenizer()
    p = plan(fmt, choice)
    cg = compiler.compile(("ebnf", forced_grammar(p)))
    for seed in range(6):
        m = Matcher(cg)
        gen = torch.Generator().manual_seed(seed)
        ids: list[int] = []
        bitmask = torch.empty(1, (TINY_VOCAB + 31) // 32, dtype=torch.int32)
        for _ in range(400):
            m.fill(bitmask, 0)
            logits = torch.randn(1, TINY_VOCAB, generator=gen)
            logits[0, EOS_ID] += 3.0
            apply_token_bitmask(logits, bitmask)
            t = int(logits.argmax())
            assert m.advance(t)
            if t == EOS_ID:
                break
            ids.append(t)
        assert m.is_terminated, "walk did not end"
        content, calls = parse(p, tok.decode(ids))
        assert calls and content == "", repr(tok.decode(ids))
        for c in calls:
            args = json.loads(c["function"]["arguments"])
            schema = next(t["function"]["parameters"] for t in (WEATHER, TIME)
                          if t["function"]["name"] == c["function"]["name"])
            jsonschema.validate(args, schema)
            if isinstance(choice, dict):
                assert c["function"]["name"] == "get_weather"
