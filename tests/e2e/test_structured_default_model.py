"""Structured output on the default model (SmolLM2-135M-Instruct) through the openai client:
a JSON-schema answer that validates, a forced tool call whose arguments match the tool, the
same call streamed, and the tool result fed back."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.e2e.conftest import Server
from tests.fixtures import json_schema_check as jsonschema

CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20},
    "population_millions": {"type": "number", "minimum": 0, "maximum": 100}},
    "required": ["city", "country", "population_millions"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


@pytest.mark.slow
def test_default_model_structured_output_and_tools(server_factory: Any,
                                                   default_model_dir: Any) -> None:
    s: Server = server_factory(None)
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=180)
    model = client.models.list().data[0].id
    msgs = [{"role": "user", "content": "Give the capital of France as JSON."}]
    r = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=80, temperature=0,  # type: ignore[arg-type]
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": CITY, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    answer = json.loads(r.choices[0].message.content or "")
    jsonschema.validate(answer, CITY)

    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw: dict[str, Any] = {"model": model, "messages": ask, "tools": [WEATHER],
                          "tool_choice": "required", "max_tokens": 80, "temperature": 0}
    full = client.chat.completions.create(**kw)
    c = full.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    call = c.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather"
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    streamed: dict[int, dict[str, str]] = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            slot = streamed.setdefault(d.index, {"name": "", "arguments": ""})
            slot["name"] += (d.function.name or "") if d.function else ""
            slot["arguments"] += (d.function.arguments or "") if d.function else ""
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(streamed.items())] == \
        [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls]
    history = [*ask, c.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    final = client.chat.completions.create(model=model, messages=history, tools=[WEATHER],  # type: ignore[arg-type]
                                           max_tokens=30, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
