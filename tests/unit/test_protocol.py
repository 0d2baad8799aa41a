"""Request validation: every bad input is an APIError(400) naming the problem."""

from __future__ import annotations

import json

import pytest

from radixrt.server import native_protocol as native
from radixrt.server import protocol as p

LIMITS = p.ModelLimits(vocab_size=100, max_context_len=64, max_request_tokens=None)


def chat(**kw: object) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **kw}).encode()


def test_parse_chat_and_params() -> None:
    req = p.parse_body(chat(temperature=0, top_p=0.5, n=2, stop="x", max_tokens=5),
                       p.ChatCompletionRequest)
    params = p.finalize_params(p.openai_params(req), 10, req.max_tokens, LIMITS, None)
    assert params.temperature == 0 and params.n == 2 and params.stop == ("x",)
    assert params.max_new_tokens == 5


@pytest.mark.parametrize("raw,param", [
    (b"{not json", None),
    (b"", None),
    (json.dumps({"model": "m"}).encode(), "messages"),
    (chat(max_tokens="5"), "max_tokens"),
    (chat(n=True), "n"),
    (chat(frobnicate=1), "frobnicate"),  # unsupported fields are refused, never ignored
    (chat(reasoning_effort="high"), "reasoning_effort"),
    (chat(stream_options={"include_usage": True, "extra": 1}), "extra"),
    (chat(timeout="soon"), "timeout"),
])
def test_parse_errors(raw: bytes, param: str | None) -> None:
    with pytest.raises(p.APIError) as e:
        p.parse_body(raw, p.ChatCompletionRequest)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("kw,param", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 10_000}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs=true
])
def test_bad_sampling_values(kw: dict[str, object], param: str) -> None:
    req = p.parse_body(chat(**kw), p.ChatCompletionRequest)
    with pytest.raises(p.APIError) as e:
        p.openai_params(req)
    assert e.value.status == 400 and e.value.param == param


def test_lengths_against_context() -> None:
    assert p.check_lengths(10, None, LIMITS, None) == 54  # default: the rest of the window
    assert p.check_lengths(10, None, LIMITS, 16) == 16
    for prompt_len, max_tokens, needle in [(0, 5, "empty"), (64, 1, "context length"),
                                           (10, 0, "at least 1"), (10, 55, "context length")]:
        with pytest.raises(p.APIError, match=needle):
            p.check_lengths(prompt_len, max_tokens, LIMITS, None)
    capped = p.ModelLimits(100, 64, max_request_tokens=8)
    with pytest.raises(p.APIError, match="limit"):
        p.check_lengths(10, 9, capped, None)


def test_prompts_token_ids_salt_model_messages() -> None:
    assert p.prompt_inputs("a") == ["a"]
    assert p.prompt_inputs([1, 2]) == [[1, 2]]
    assert p.prompt_inputs(["a", [3]]) == ["a", [3]]
    for bad in ("", [], [[]], [1.5], {"x": 1}):
        with pytest.raises(p.APIError):
            p.prompt_inputs(bad)
    with pytest.raises(p.APIError, match="outside the vocabulary"):
        p.check_token_ids([1, 100], 100, "prompt")
    assert p.validate_cache_salt("tenant-1") == "tenant-1"
    for bad_salt in ("", 5, "x" * 300, "a\nb"):
        with pytest.raises(p.APIError, match="cache_salt"):
            p.validate_cache_salt(bad_salt)
    with pytest.raises(p.APIError, match="does not exist"):
        p.check_model_name("gpt-4", ("tiny",))
    p.check_model_name(None, ("tiny",))
    msgs = p.chat_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                         {"type": "text", "text": "b"}]}])
    assert msgs[0]["content"] == "ab"
    with pytest.raises(p.APIError, match="role"):
        p.chat_messages([{"role": "wizard", "content": "x"}])


def test_native_params() -> None:
    sp = p.native_params({"max_new_tokens": 3, "stop": ["a"], "temperature": 0})
    assert sp.max_new_tokens == 3 and sp.stop == ("a",)
    with pytest.raises(p.APIError, match="bogus"):
        p.native_params({"bogus": 1})


def test_sequences_cap_and_client_template() -> None:
    p.check_sequences(4, 64, 256)
    with pytest.raises(p.APIError, match="200 prompt") as e:
        p.check_sequences(200, 64, 256)
    assert e.value.param == "n"
    req = p.parse_body(chat(chat_template="{{ x }}"), p.ChatCompletionRequest)
    with pytest.raises(p.APIError, match="allow-request-chat-template") as e:
        p.request_chat_template(req, allowed=False)
    assert e.value.param == "chat_template"
    assert p.request_chat_template(req, allowed=True) == "{{ x }}"
    via_kwargs = p.parse_body(chat(chat_template_kwargs={"chat_template": "t"}),
                              p.ChatCompletionRequest)
    assert p.request_chat_template(via_kwargs, allowed=True) == "t"
    assert p.request_chat_template(p.parse_body(chat(), p.ChatCompletionRequest), False) is None


@pytest.mark.parametrize("raw,param,needle", [
    (b'{"messages": [], "temperature": NaN}', "temperature", "finite"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "content", "surrogate"),
    (b"[" * 65 + b"]" * 65, None, "deeper"),
    (b"[" * 64 + b"]" * 64, None, "Invalid request"),  # depth 64 is allowed: the schema says no
    (b'{"messages": [}', "messages", "Malformed"),  # the field the error is in
])
def test_parse_body_hostile(raw: bytes, param: str | None, needle: str) -> None:
    with pytest.raises(p.APIError, match=needle) as e:
        p.parse_body(raw, p.ChatCompletionRequest)
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize("schema,body", [
    (p.CompletionRequest, {"prompt": "x", "best_off": 2}),
    (p.GenerateRequest, {"text": "x", "sampling_param": {}}),
])
def test_unknown_fields_are_refused_on_every_endpoint(schema: type, body: dict) -> None:
    with pytest.raises(p.APIError) as e:
        p.parse_body(json.dumps(body).encode(), schema)
    assert e.value.status == 400 and e.value.param in body and "refused" in e.value.message


def test_request_timeout_range() -> None:
    assert p.request_timeout(None) is None and p.request_timeout(2) == 2.0
    for bad in (0, -1.0, float("inf"), float("nan"), 1e12, True):
        with pytest.raises(p.APIError) as e:
            p.request_timeout(bad)  # type: ignore[arg-type]
        assert e.value.status == 400 and e.value.param == "timeout"


# ---------------------------------------------------------------- SGLang's /generate body


def generate(**body: object) -> p.GenerateRequest:
    return p.parse_body(json.dumps(body).encode(), p.GenerateRequest)  # type: ignore[no-any-return]


def test_native_prompts_single_and_batched() -> None:
    items, batched = native.prompts(generate(text="hi", rid="r1", return_logprob=True,
                                             logprob_start_len=-1, top_logprobs_num=2))
    assert not batched and items[0].prompt == "hi" and items[0].rid == "r1"
    assert items[0].logprobs == native.LogprobOptions(None, 2, False)  # -1: output rows only
    items, batched = native.prompts(generate(
        input_ids=[[1, 2], [3]], sampling_params=[{"n": 2}, {"n": 1}], rid=["a", "b"],
        return_logprob=[True, False], logprob_start_len=[0, 0], return_text_in_logprobs=True))
    assert batched and [i.prompt for i in items] == [[1, 2], [3]]
    assert [i.sampling for i in items] == [{"n": 2}, {"n": 1}]
    assert items[0].logprobs == native.LogprobOptions(0, 0, True) and items[1].logprobs is None
    # One value for every prompt of a batch.
    items, _ = native.prompts(generate(text=["a", "b"], sampling_params={"temperature": 0}))
    assert [i.sampling for i in items] == [{"temperature": 0}] * 2 and items[1].rid is None


@pytest.mark.parametrize("body,param", [
    ({}, "text"),
    ({"text": "a", "input_ids": [1]}, "text"),
    ({"text": []}, "text"),
    ({"text": [""]}, "text"),
    ({"input_ids": [[1], "x"]}, "input_ids"),
    ({"input_ids": [[]]}, "input_ids"),
    ({"text": ["a", "b"], "sampling_params": [{}, {}, {}]}, "sampling_params"),
    ({"text": "a", "rid": ["x"]}, "rid"),  # a list for one prompt
    ({"text": ["a", "b"], "rid": ["x", "x"]}, "rid"),
    ({"text": "a", "rid": ""}, "rid"),
    ({"text": "a", "return_logprob": True, "logprob_start_len": -2}, "logprob_start_len"),
    ({"text": "a", "return_logprob": True, "top_logprobs_num": -1}, "top_logprobs_num"),
    ({"text": "a", "image_data": "x.png"}, "image_data"),
    ({"text": "a", "lora_path": "adapter"}, "lora_path"),
    ({"text": "a", "return_hidden_states": True}, "return_hidden_states"),
])
def test_native_prompts_errors(body: dict[str, object], param: str) -> None:
    with pytest.raises(p.APIError) as e:
        native.prompts(generate(**body))
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_native_sampling_keys() -> None:
    params, asked = native.sampling_params({
        "max_new_tokens": 0, "min_new_tokens": None, "stop": [], "stop_regex": [],
        "regex": None, "json_schema": None, "spaces_between_special_tokens": True,
        "sampling_seed": 7, "temperature": 1e-9, "top_k": 1 << 30, "no_stop_trim": True,
        "stream_interval": 1, "custom_params": None, "ignore_eos": None})
    assert asked == 0 and params.seed == 7 and params.temperature == 0.0
    assert params.no_stop_trim and params.stop == () and not params.ignore_eos
    params, asked = native.sampling_params({"max_tokens": 5, "json_schema": {"type": "object"},
                                            "min_new_tokens": 0})
    assert asked == 5 and params.json_schema == '{"type": "object"}'
    assert native.sampling_params({})[1] is None  # the server's default applies
    assert native.sampling_params({"stop_regex": "a+"})[0].stop_regex == ("a+",)
    assert native.sampling_params({"stop_regex": ["a+", "b"]})[0].stop_regex == ("a+", "b")


@pytest.mark.parametrize("sp,param", [
    ({"stop_regex": ["(unclosed"]}, "stop_regex"),
    ({"stop_regex": ["x" * 2000]}, "stop_regex"),
    ({"stop_regex": 3}, "stop_regex"),
    ({"structural_tag": "{}"}, "structural_tag"),
    ({"custom_params": {"k": 1}}, "custom_params"),
    ({"stream_interval": 8}, "stream_interval"),
    ({"spaces_between_special_tokens": 1}, "spaces_between_special_tokens"),
    ({"skip_special_tokens": False, "spaces_between_special_tokens": True},
     "spaces_between_special_tokens"),
    ({"max_new_tokens": "3"}, "max_new_tokens"),
    ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"min_new_tokens": 2, "regex": "a+"}, "min_new_tokens"),
    ({"frobnicate": 1}, "sampling_params"),
])
def test_native_sampling_key_errors(sp: dict[str, object], param: str) -> None:
    with pytest.raises(p.APIError) as e:
        native.sampling_params(sp)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_prefill_only_lengths() -> None:
    assert p.check_lengths(10, 0, LIMITS, 128, allow_zero=True) == 0
    with pytest.raises(p.APIError, match="at least 1"):
        p.check_lengths(10, 0, LIMITS, 128)  # the OpenAI endpoints keep their minimum
