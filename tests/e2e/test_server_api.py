"""The HTTP API on a tiny random model: openai client (streaming and not), native /generate,
bad input, auth, cache_salt isolation, multi-turn prefix caching vs the in-process engine."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from radixrt.sampling_params import SamplingParams
from tests.e2e.conftest import API_KEY, Server

PAGE = 16


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Any) -> Any:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def server(server_factory: Any, model_dir: Any) -> Server:
    return server_factory(model_dir, "--page-size", str(PAGE), "--served-model-name", "tiny",
                          api_key=API_KEY)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=60)


def post(server: Server, path: str, body: Any, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={**server.headers, "Content-Type": "application/json"})


def test_models_and_auth(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = httpx.get(server.url + "/v1/models")  # no key
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200  # open without a key
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_chat_non_streaming_and_streaming_agree(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12,
                                          temperature=0)  # type: ignore[arg-type]
    c = full.choices[0]
    assert c.finish_reason in ("length", "stop") and full.usage is not None
    assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens > 5
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # type: ignore[arg-type]
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == c.message.content and finish == c.finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    # The second identical prompt hits the cache for its full pages.
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens >= (usage.prompt_tokens // PAGE - 1) * PAGE


def test_completions_n_logprobs_batch(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt=["Hello there", [5, 6, 7, 8]],
                                  max_tokens=5, n=2, temperature=1.0, seed=1, logprobs=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    for ch in r.choices:
        assert ch.logprobs is not None and len(ch.logprobs.token_logprobs or []) == 5
        assert all(len(t) <= 3 for t in ch.logprobs.top_logprobs or [])
    assert r.usage is not None and r.usage.completion_tokens == 20


def test_chat_logprobs_and_stop_string(server: Server, client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Hello"}]
    base = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20,
                                          temperature=0, logprobs=True, top_logprobs=2)  # type: ignore[arg-type]
    content = base.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == base.usage.completion_tokens  # type: ignore[union-attr]
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in content)
    text = base.choices[0].message.content or ""
    stop = text[3:6]  # a stop string from the middle of the greedy answer
    if len(stop) < 3:
        pytest.skip("greedy answer too short to cut")
    cut = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20,
                                         temperature=0, stop=[stop])  # type: ignore[arg-type]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_native_generate(server: Server) -> None:
    r = post(server, "/generate", {"input_ids": [3, 4, 5, 6], "sampling_params":
                                   {"max_new_tokens": 6, "temperature": 0}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["output_ids"]) == 6 and out["meta_info"]["finish_reason"]["type"] == "length"
    with httpx.stream("POST", server.url + "/generate", headers=server.headers, timeout=60,
                      json={"text": "Hi", "stream": True,
                            "sampling_params": {"max_new_tokens": 4}}) as s:
        events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["meta_info"]["completion_tokens"] == 4


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/chat/completions", {"model": "tiny"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, "context length"),
    ("/v1/completions", {"prompt": [1] * 5000}, "context length"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n must be"),
    ("/v1/completions", {"prompt": "hi", "n": 1000}, "n must be"),
    ("/v1/completions", {"prompt": [1, 2, 512]}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, "gpt-4"),
    ("/v1/completions", {"prompt": "hi", "cache_salt": ""}, "cache_salt"),
    ("/v1/completions", {"prompt": "hi", "cache_salt": 7}, "cache_salt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("/generate", {"input_ids": [-1, 3]}, "outside the vocabulary"),
    ("/generate", {"text": "hi", "sampling_params": {"bogus": 1}}, "bogus"),
])
def test_bad_input_is_400_naming_the_problem(server: Server, path: str, body: Any,
                                             needle: str) -> None:
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_malformed_json_then_still_serving(server: Server, client: openai.OpenAI) -> None:
    r = post(server, "/v1/chat/completions", None, raw=b'{"messages": [')
    assert r.status_code == 400 and "Malformed JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=-3)
    ok = client.completions.create(model="tiny", prompt="still alive?", max_tokens=3)
    assert ok.usage is not None and ok.usage.completion_tokens == 3


def test_cache_salt_isolates_tenants(server: Server) -> None:
    prompt = list(range(10, 10 + 3 * PAGE + 3))
    body = {"prompt": prompt, "max_tokens": 1}
    post(server, "/v1/completions", {**body, "cache_salt": "tenant-a"})
    again = post(server, "/v1/completions", {**body, "cache_salt": "tenant-a"}).json()
    other = post(server, "/v1/completions", {**body, "cache_salt": "tenant-b"}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 3 * PAGE
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_multi_turn_cache_and_engine_parity(client: openai.OpenAI, model_dir: Any) -> None:
    from radixrt import Engine

    engine = Engine(model=str(model_dir), page_size=PAGE)
    msgs: list[dict[str, str]] = [{"role": "system", "content": "You are terse."}]
    prev_prompt_tokens = 0
    for k, question in enumerate(["Hello, how are you?", "What is a radix tree?",
                                  "And a page table?"]):
        msgs.append({"role": "user", "content": question})
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8,  # type: ignore[arg-type]
                                           temperature=0)
        answer = r.choices[0].message.content or ""
        ref = engine.chat(msgs, SamplingParams(max_new_tokens=8, temperature=0))[0]
        assert answer == ref.text, f"turn {k}: server and in-process engine disagree"
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached = r.usage.prompt_tokens_details.cached_tokens or 0
        if k > 0:  # turn k's whole prompt is a prefix of turn k+1's: its full pages hit
            assert cached >= prev_prompt_tokens // PAGE * PAGE
        prev_prompt_tokens = r.usage.prompt_tokens
        msgs.append({"role": "assistant", "content": answer})
