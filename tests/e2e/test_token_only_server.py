"""A server without a tokenizer (dummy-weight preset, and --skip-tokenizer-init on a model that has
one): token ids in, token ids out; text, chat and stop strings get a 400 and serving goes on."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from radixrt.sampling_params import SamplingParams
from tests.e2e.conftest import Server

PAGE = 16
MODEL = "llama-tiny"
PROMPT = [(7 * i + 3) % 500 + 2 for i in range(40)]  # 40 tokens: two full pages to cache
MAX_NEW = 12
NO_TOKENIZER = "this server has no tokenizer: send token ids"


@pytest.fixture(scope="module")
def server(server_factory: Any) -> Server:
    return server_factory(None, "--model", MODEL, "--load-format", "dummy",
                          "--page-size", str(PAGE))


@pytest.fixture(scope="module")
def expected() -> list[int]:
    """Greedy ids from the in-process engine: same preset and seed, so the same weights."""
    from radixrt import Engine

    engine = Engine(MODEL, load_format="dummy", page_size=PAGE)
    assert engine.tokenizer is None
    out = engine.generate(PROMPT, SamplingParams(max_new_tokens=MAX_NEW, temperature=0,
                                                 ignore_eos=True))
    assert len(out[0].token_ids) == MAX_NEW
    return out[0].token_ids


def post(server: Server, path: str, body: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60, headers=server.headers)


def greedy(**extra: Any) -> dict[str, Any]:
    return {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True, **extra}


def sse_events(server: Server, path: str, body: Any) -> list[Any]:
    with httpx.stream("POST", server.url + path, json=body, timeout=60,
                      headers=server.headers) as s:
        assert s.status_code == 200
        lines = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_generate_matches_engine_and_caches(server: Server, expected: list[int]) -> None:
    first = post(server, "/generate", {"input_ids": PROMPT, "sampling_params": greedy()})
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["output_ids"] == expected and out["text"] == ""
    assert out["meta_info"]["prompt_tokens"] == len(PROMPT)
    assert out["meta_info"]["completion_tokens"] == MAX_NEW
    again = post(server, "/generate", {"input_ids": PROMPT, "sampling_params": greedy()}).json()
    assert again["output_ids"] == expected
    # The repeat finds the prompt's full pages in the radix cache.
    assert again["meta_info"]["cached_tokens"] >= (len(PROMPT) // PAGE) * PAGE - PAGE
    assert again["meta_info"]["cached_tokens"] > 0


def test_completions_return_token_ids(server: Server, expected: list[int]) -> None:
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": MAX_NEW,
                                         "temperature": 0, "ignore_eos": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == "" and choice["token_ids"] == expected
    assert choice["finish_reason"] == "length"
    # No token strings without a tokenizer: logprob entries name tokens by id.
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in expected]
    assert len(lp["token_logprobs"]) == MAX_NEW and all(x <= 0 for x in lp["token_logprobs"])
    assert all(len(top) == 2 and all(k.startswith("token_id:") for k in top)
               for top in lp["top_logprobs"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(PROMPT) and usage["completion_tokens"] == MAX_NEW
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0  # cached by the test above


def test_streaming(server: Server, expected: list[int]) -> None:
    native = sse_events(server, "/generate", {"input_ids": PROMPT, "stream": True,
                                              "sampling_params": greedy()})
    # Cumulative events as tokens arrive, not only the first and the last.
    assert len(native) > 2
    assert all(expected[:len(ev["output_ids"])] == ev["output_ids"] for ev in native)
    assert native[-1]["output_ids"] == expected and native[-1]["text"] == ""
    assert native[-1]["meta_info"]["finish_reason"]["type"] == "length"

    chunks = sse_events(server, "/v1/completions", {
        "prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}})
    ids = [t for c in chunks for ch in c["choices"] for t in ch["token_ids"]]
    assert ids == expected
    assert all(ch["text"] == "" for c in chunks for ch in c["choices"])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == MAX_NEW


def test_stop_token_ids(server: Server, expected: list[int]) -> None:
    stop = expected[4]
    cut = expected[:expected.index(stop)]
    out = post(server, "/generate", {"input_ids": PROMPT,
                                     "sampling_params": greedy(stop_token_ids=[stop])}).json()
    assert out["output_ids"] == cut
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": MAX_NEW,
                                         "temperature": 0, "ignore_eos": True,
                                         "stop_token_ids": [stop]}).json()
    assert r["choices"][0]["token_ids"] == cut and r["choices"][0]["matched_stop"] == stop


@pytest.mark.parametrize("path,body,param", [
    ("/generate", {"text": "hello", "sampling_params": {"max_new_tokens": 2}}, "text"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], "hello"], "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True},
     "messages"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 2, "stop": ["\n"]}, "stop"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"stop": "x"}}, "stop"),
])
def test_text_inputs_rejected(server: Server, path: str, body: Any, param: str) -> None:
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert NO_TOKENIZER in err["message"] and err["param"] == param


def test_serves_after_bad_requests(server: Server, expected: list[int]) -> None:
    assert post(server, "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}]}).status_code == 400
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    out = post(server, "/generate", {"input_ids": PROMPT, "sampling_params": greedy()}).json()
    assert out["output_ids"] == expected


def test_skip_tokenizer_init_flag(server_factory: Any, tiny_model_dir: Any) -> None:
    """A model that has a tokenizer, served token-only on request."""
    s = server_factory(tiny_model_dir("llama"), "--skip-tokenizer-init")
    r = post(s, "/v1/completions", {"prompt": "hello", "max_tokens": 2})
    assert r.status_code == 400 and NO_TOKENIZER in r.json()["error"]["message"]
    ok = post(s, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0,
                                     "ignore_eos": True}).json()
    assert ok["choices"][0]["text"] == "" and len(ok["choices"][0]["token_ids"]) == 3
