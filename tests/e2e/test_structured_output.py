"""Structured output through the real server and the official openai client, on a tiny model:
response_format, tools / tool_choice (forced calls always parse and match their schema;
streamed tool-call deltas reassemble to the non-streamed result), logit_bias, native
/generate grammars, LangChain's with_structured_output and bind_tools, and a 400 naming the
field for every bad or unsupported input."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import httpx
import openai
import pytest

from tests.e2e.conftest import Server
from tests.fixtures import json_schema_check as jsonschema

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 10},
                                  "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "clock", "parameters": {"type": "object", "properties": {},
                                    "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"],
           "clock": CLOCK["function"]["parameters"]}
MSGS = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def server(server_factory: Any, tiny_model_dir: Any) -> Server:
    return server_factory(tiny_model_dir("llama"), "--served-model-name", "tiny")


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def post(server: Server, path: str, body: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def test_response_format_json_schema_and_object(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=80, n=3,
                                       temperature=1.0, seed=7, response_format=fmt)  # type: ignore[arg-type]
    done = [c for c in r.choices if c.finish_reason == "stop"]
    assert done, [c.message.content for c in r.choices]
    for c in done:
        jsonschema.validate(json.loads(c.message.content or ""), PERSON)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=80,
                                       temperature=1.0, seed=3,
                                       response_format={"type": "json_object"})
    c = r.choices[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content or ""), dict)
    else:
        assert (c.message.content or "").startswith("{")


def _check_calls(calls: Any, allowed: set[str]) -> list[tuple[str, Any]]:
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        name, args = call.function.name, json.loads(call.function.arguments)
        assert name in allowed
        jsonschema.validate(args, SCHEMAS[name])
        out.append((name, args))
    return out


@pytest.mark.parametrize("choice,parallel", [
    ("required", True), ("required", False),
    ({"type": "function", "function": {"name": "clock"}}, None)])
def test_forced_tool_calls_parse_and_stream_the_same(client: openai.OpenAI, choice: Any,
                                                     parallel: bool | None) -> None:
    allowed = {"clock"} if isinstance(choice, dict) else {"get_weather", "clock"}
    kw: dict[str, Any] = {"model": "tiny", "messages": MSGS, "tools": [WEATHER, CLOCK],
                          "tool_choice": choice, "max_tokens": 150, "temperature": 1.0,
                          "seed": 11}
    if parallel is not None:
        kw["parallel_tool_calls"] = parallel
    full = client.chat.completions.create(**kw)
    c = full.choices[0]
    if c.finish_reason == "length":
        pytest.skip("the random model ran out of tokens inside a call")
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    calls = _check_calls(c.message.tool_calls, allowed)
    if parallel is False or isinstance(choice, dict):
        assert len(calls) == 1
    # The same request streamed: each call's header (id, type, name) comes as soon as the
    # name is generated, its arguments in pieces; they reassemble to the same text.
    got: dict[int, dict[str, Any]] = {}
    finish = None
    chunks = list(client.chat.completions.create(**kw, stream=True))
    header_at: dict[int, int] = {}
    pieces = 0
    for n, chunk in enumerate(chunks):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                slot = got.setdefault(d.index, {"name": "", "arguments": ""})
                if d.id:
                    assert d.type == "function" and d.id.startswith("call_")
                    header_at[d.index] = n
                if d.function and d.function.name:
                    slot["name"] += d.function.name
                if d.function and d.function.arguments:
                    slot["arguments"] += d.function.arguments
                    pieces += 1
    assert finish == "tool_calls"
    assert [(g["name"], g["arguments"]) for _, g in sorted(got.items())] == \
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
    assert header_at[0] < len(chunks) - 2 and pieces > len(got), (header_at, pieces)


def test_tool_history_round_trip_and_auto(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER],
                                           tool_choice="required", max_tokens=150, seed=2,
                                           temperature=1.0)  # type: ignore[arg-type]
    msg = first.choices[0].message
    if not msg.tool_calls:
        pytest.skip("the random model ran out of tokens inside a call")
    history = [*MSGS, msg.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "12 C"}]
    nxt = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER],
                                         max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert nxt.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER],
                                          tool_choice="none", max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert not none.choices[0].message.tool_calls
    plain = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10,
                                           temperature=0)  # type: ignore[arg-type]
    # The tools never reached the prompt: same prompt, same greedy answer.
    assert none.usage is not None and plain.usage is not None
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_logit_bias_removes_and_forces(client: openai.OpenAI, server: Server) -> None:
    body = {"text": "The capital of France is", "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}
    first = post(server, "/generate", body).json()["output_ids"][0]
    body["sampling_params"]["logit_bias"] = {str(first): -100}
    assert post(server, "/generate", body).json()["output_ids"][0] != first
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=1.0,
                                  logit_bias={"77": 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text  # forced token 77 every step
    ids = post(server, "/generate", {"text": "Hello", "sampling_params": {
        "max_new_tokens": 4, "temperature": 1.0, "ignore_eos": True,
        "logit_bias": {"77": 100}}}).json()["output_ids"]
    assert ids == [77] * 4


@pytest.mark.parametrize("key,value,check", [
    ("regex", r"(cat|dog)-[0-9]{3}", lambda t: re.fullmatch(r"(cat|dog)-[0-9]{3}", t)),
    ("json_schema", PERSON, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ("ebnf", 'root ::= "(" [a-c]+ ")"', lambda t: re.fullmatch(r"\([a-c]+\)", t)),
])
def test_native_generate_grammars(server: Server, key: str, value: Any, check: Any) -> None:
    for seed in range(3):
        r = post(server, "/generate", {"text": "Answer:", "sampling_params": {
            "max_new_tokens": 60, "temperature": 1.0, "seed": seed, key: value}})
        assert r.status_code == 200, r.text
        out = r.json()
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            assert check(out["text"]), out["text"]


def _deep(n: int) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "integer"}
    for _ in range(n):
        s = {"type": "array", "items": s}
    return s


@pytest.mark.parametrize("path,body,param", [
    ("/generate", {"text": "x", "sampling_params": {"regex": "a(b"}}, "regex"),
    ("/generate", {"text": "x", "sampling_params": {"ebnf": "root ::= nope"}}, "ebnf"),
    ("/generate", {"text": "x", "sampling_params": {"json_schema": {"type": "frob"}}},
     "json_schema"),
    ("/generate", {"text": "x", "sampling_params": {"json_schema": _deep(40)}}, "json_schema"),
    ("/generate", {"text": "x", "sampling_params": {"regex": "a" * 70000}}, "regex"),
    ("/generate", {"text": "x", "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}},
     "regex"),
    ("/generate", {"text": "x", "sampling_params": {"regex": "a", "ignore_eos": True}},
     "ignore_eos"),
    ("/generate", {"text": "x", "sampling_params": {"logit_bias": {"x": 1}}}, "logit_bias"),
    ("/generate", {"text": "x", "sampling_params": {"logit_bias": {"5": 101}}}, "logit_bias"),
    ("/generate", {"text": "x", "sampling_params": {"logit_bias": {"999999": 1}}},
     "logit_bias"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "xml"}},
     "response_format"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format"),
    ("/v1/chat/completions", {"messages": MSGS, "functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [{"type": "code_interpreter"}]},
     "tools"),
    ("/v1/chat/completions", {"messages": MSGS, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [WEATHER], "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_structured_inputs_are_400(server: Server, path: str, body: dict[str, Any],
                                       param: str) -> None:
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert httpx.get(server.url + "/health").status_code == 200


def test_langchain_structured_output_and_bind_tools(server: Server) -> None:
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=120)

    llm = lc.ChatOpenAI(base_url=server.url + "/v1", api_key="none", model="tiny",
                        temperature=0, max_tokens=120, max_retries=0, timeout=120)
    person = llm.with_structured_output(Person, method="json_schema", strict=True).invoke(
        "Describe a person.")
    assert isinstance(person, Person) and 0 <= person.age <= 120

    class GetWeather(BaseModel):
        """Current weather in a city."""

        city: str = Field(max_length=10)
        unit: Literal["c", "f"]

    for choice in ("GetWeather", "any"):
        msg = llm.bind_tools([GetWeather], tool_choice=choice).invoke(
            "What is the weather in Oslo?")
        assert msg.tool_calls, msg
        call = msg.tool_calls[0]
        assert call["name"] == "GetWeather"
        GetWeather(**call["args"])
    # Streaming: LangChain merges the tool-call chunks into the same call.
    bound = llm.bind_tools([GetWeather], tool_choice="GetWeather")
    whole = bound.invoke("What is the weather in Oslo?")
    merged = None
    for part in bound.stream("What is the weather in Oslo?"):
        merged = part if merged is None else merged + part
    assert merged is not None and merged.tool_calls
    assert [(t["name"], t["args"]) for t in merged.tool_calls] == \
        [(t["name"], t["args"]) for t in whole.tool_calls]


def test_dsl_grammars_over_http(server: Server, tiny_model_dir: Any) -> None:
    from radixrt.lang import RuntimeEndpoint, function, gen, gen_int

    @function
    def form(s: Any) -> None:
        s += "Pet: "
        s += gen("pet", regex="(cat|dog)")
        s += "\nAge: "
        s += gen_int("age", max_tokens=8)
        s += "\nJSON: "
        s += gen("obj", max_tokens=80, json_schema=PERSON)

    backend = RuntimeEndpoint(server.url, tokenizer=str(tiny_model_dir("llama")))
    st = form.run(backend=backend, temperature=1.0, seed=4)
    assert st["pet"] in ("cat", "dog")
    assert re.fullmatch(r"-?(0|[1-9][0-9]*)", st["age"]) or \
        st.get_meta_info("age")["finish_reason"] == "length"
    if st.get_meta_info("obj")["finish_reason"] == "stop":
        jsonschema.validate(json.loads(st["obj"]), PERSON)
