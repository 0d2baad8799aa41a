"""Router side of structured output, in process: what each request field turns into (the
grammar in SamplingParams, the tools in the prompt), and the 400s."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from radixrt.server.config import ServerConfig
from radixrt.server.metrics import ServerMetrics
from radixrt.server.protocol import APIError, ModelLimits
from radixrt.server.router import chat_job, completion_job, generate_job
from radixrt.server.serving import Job, ServingContext
from radixrt.server.tokenization import TextCodec
from tests.fixtures.tiny_models import build_tokenizer

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}
MSGS = [{"role": "user", "content": "hi"}]
# A Qwen-style template: renders the tools itself and names the <tool_call> format.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t['function']['name'] }}"
    "{% endfor %}\nAnswer with <tool_call></tool_call>.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_ctx(template: str | None = None) -> ServingContext:
    tok = build_tokenizer()
    if template is not None:
        tok.chat_template = template
    return ServingContext(ServerConfig(), None, TextCodec(tok),  # type: ignore[arg-type]
                          ServerMetrics(), ModelLimits(512, 4096), ("tiny",))


def job(ctx: ServingContext, builder: Any, body: dict[str, Any]) -> Job:
    request = SimpleNamespace(state=SimpleNamespace(api_key=None))
    return builder(ctx, request, json.dumps(body).encode())


def test_response_format_and_forced_tools_become_grammars() -> None:
    ctx = make_ctx()
    j = job(ctx, chat_job, {"messages": MSGS, "response_format": {"type": "json_object"}})
    assert j.params.json_schema == '{"type": "object"}' and j.tools is None
    j = job(ctx, chat_job, {"messages": MSGS, "tools": [TOOL], "tool_choice": "required"})
    assert j.params.ebnf is not None and "<tool_call>" in j.params.ebnf and j.tools is not None
    j = job(ctx, chat_job, {"messages": MSGS, "tools": [TOOL]})  # auto: free text, parsed
    assert j.params.constraint is None and j.tools is not None and j.tools.choice == "auto"
    j = job(ctx, chat_job, {"messages": MSGS, "tools": [TOOL], "tool_choice": "none"})
    assert j.params.constraint is None and j.tools is None


def test_tools_reach_the_prompt_through_the_template_or_the_system_message() -> None:
    for template, native in ((None, False), (TOOL_TEMPLATE, True)):
        ctx = make_ctx(template)
        plain = job(ctx, chat_job, {"messages": MSGS})
        tooled = job(ctx, chat_job, {"messages": MSGS, "tools": [TOOL]})
        assert tooled.tools is not None and tooled.tools.native is native
        text = ctx.codec.decode(tooled.prompts[0], skip_special_tokens=False)  # type: ignore[union-attr]
        assert "lookup" in text and len(tooled.prompts[0]) > len(plain.prompts[0])


def test_tool_choice_none_leaves_the_tools_out_of_the_prompt() -> None:
    """tool_choice "none": the prompt is token for token the prompt without tools (so
    prompt_tokens match too), through the template's tools argument or our system message,
    with or without earlier calls in the history; nothing is parsed or constrained."""
    history = [*MSGS, {"role": "assistant", "content": "",
                       "tool_calls": [{"id": "call_1", "type": "function",
                                       "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "found"}]
    for template in (None, TOOL_TEMPLATE):
        ctx = make_ctx(template)
        for msgs in (MSGS, history):
            plain = job(ctx, chat_job, {"messages": msgs})
            none = job(ctx, chat_job, {"messages": msgs, "tools": [TOOL], "tool_choice": "none"})
            auto = job(ctx, chat_job, {"messages": msgs, "tools": [TOOL]})
            assert none.prompts == plain.prompts and auto.prompts != plain.prompts
            assert none.tools is None and none.params.constraint is None


def test_completions_response_format_and_single_call_when_not_parallel() -> None:
    from radixrt.server.tool_calls import make_plan, parse

    ctx = make_ctx()
    j = job(ctx, completion_job, {"prompt": "x", "response_format": {"type": "json_object"}})
    assert j.params.json_schema == '{"type": "object"}'
    two = ('<tool_call>\n{"name": "lookup", "arguments": {"q": "a"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "lookup", "arguments": {"q": "b"}}\n</tool_call>')
    assert len(parse(make_plan([TOOL], "auto", True, ""), two)[1]) == 2
    assert len(parse(make_plan([TOOL], "auto", False, ""), two)[1]) == 1


def test_guided_fields() -> None:
    ctx = make_ctx()
    j = job(ctx, completion_job, {"prompt": "x", "guided_choice": ["a.b", "c"]})
    assert j.params.regex == r"(a\.b)|(c)"
    j = job(ctx, chat_job, {"messages": MSGS, "guided_json": {"type": "object"}})
    assert j.params.json_schema == '{"type": "object"}'
    for builder, body, param in [
        (completion_job, {"prompt": "x", "guided_regex": "a(", }, "guided_regex"),
        (completion_job, {"prompt": "x", "guided_regex": "a", "guided_grammar": "root ::= x"},
         "guided_grammar"),
        (chat_job, {"messages": MSGS, "guided_json": {"type": "object"},
                    "response_format": {"type": "json_object"}}, "guided_json"),
        (completion_job, {"prompt": "x", "guided_choice": []}, "guided_choice"),
        (generate_job, {"text": "x", "sampling_params": {"regex": "(", "n": 1}}, "regex"),
    ]:
        with pytest.raises(APIError) as e:
            job(ctx, builder, body)
        assert e.value.status == 400 and e.value.param == param, e.value.message
