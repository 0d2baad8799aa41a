"""SGLang's native HTTP API on a tiny model, as its frontend and benchmark clients use it:
model / server info, prefill-only requests that cache a prefix, batches in order, SGLang's
logprob rows (equal to the OpenAI endpoint's), every stream event's token counts, rid + abort,
min_new_tokens, and 400s naming what we do not support."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.fixtures.tiny_models import CHATML_TEMPLATE, EOS_ID

PAGE = 16
STEM = "The scheduler admits requests, allocates pages, and evicts the least recently used. "
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Any) -> Any:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def server(server_factory: Any, model_dir: Any) -> Server:
    return server_factory(model_dir, "--page-size", str(PAGE), "--served-model-name", "tiny")


def gen(server: Server, body: dict[str, Any]) -> Any:
    r = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_model_and_server_info(server: Server, model_dir: Any) -> None:
    info = httpx.get(server.url + "/get_model_info", timeout=10).json()
    assert info["model_path"] == str(model_dir) and info["is_generation"] is True
    # A remote DSL program renders role blocks from these, with no tokenizer of its own.
    assert info["chat_template"] == CHATML_TEMPLATE
    assert info["eos_token"] == "<|im_end|>"
    a = httpx.get(server.url + "/server_info", timeout=10).json()
    b = httpx.get(server.url + "/get_server_info", timeout=10).json()
    assert a.keys() == b.keys() and a["page_size"] == PAGE and a["version"]
    assert "api_keys" not in a and len(a["internal_states"]) == 1


def test_v1_model_by_id(server: Server) -> None:
    r = httpx.get(server.url + "/v1/models/tiny", timeout=10)
    assert r.status_code == 200 and r.json()["id"] == "tiny"
    r = httpx.get(server.url + "/v1/models/org/gpt-4", timeout=10)
    err = r.json()["error"]
    assert r.status_code == 404 and "gpt-4" in err["message"] and err["param"] == "model"


def test_prefill_only_caches_the_prefix(server: Server) -> None:
    assert httpx.post(server.url + "/reset_prefix_cache", timeout=10).json() == {"flushed": True}
    first = gen(server, {"text": STEM, "sampling_params": {"max_new_tokens": 0}})
    meta = first["meta_info"]
    assert first["text"] == "" and first["output_ids"] == [] and meta["completion_tokens"] == 0
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    assert meta["prompt_tokens"] > 2 * PAGE and meta["cached_tokens"] == 0
    second = gen(server, {"text": STEM + "Then", "sampling_params": {"max_new_tokens": 3,
                                                                      **GREEDY}})
    cached = second["meta_info"]["cached_tokens"]
    assert cached >= (meta["prompt_tokens"] - 1) // PAGE * PAGE > 0, "the prefix was cached"
    assert second["meta_info"]["completion_tokens"] == 3
    # /reset_prefix_cache (vLLM's name) drops it again.
    assert httpx.post(server.url + "/reset_prefix_cache", timeout=10).status_code == 200
    third = gen(server, {"text": STEM + "Then", "sampling_params": {"max_new_tokens": 1}})
    assert third["meta_info"]["cached_tokens"] == 0


def test_batches_come_back_in_order(server: Server) -> None:
    prompts = ["Hello there", "A radix tree", "Paged attention stores"]
    singles = [gen(server, {"text": t, "sampling_params": {"max_new_tokens": 5, **GREEDY}})
               for t in prompts]
    batch = gen(server, {"text": prompts, "rid": ["a", "b", "c"],
                         "sampling_params": [{"max_new_tokens": 5, **GREEDY}] * 3})
    assert isinstance(batch, list) and [o["text"] for o in batch] == [o["text"] for o in singles]
    assert [o["meta_info"]["id"] for o in batch] == ["a", "b", "c"]
    assert [o["meta_info"]["prompt_tokens"] for o in batch] == \
        [o["meta_info"]["prompt_tokens"] for o in singles]
    # Token-id batches with their own sampling params each.
    ids = [[5, 6, 7, 8], [9, 10, 11]]
    out = gen(server, {"input_ids": ids, "sampling_params": [
        {"max_new_tokens": 2, **GREEDY}, {"max_new_tokens": 4, **GREEDY}]})
    assert [o["meta_info"]["completion_tokens"] for o in out] == [2, 4]
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [4, 3]
    # n > 1 on one text: a list of n.
    many = gen(server, {"text": "Hi", "sampling_params": {"max_new_tokens": 3, "n": 3,
                                                         "ignore_eos": True}})
    assert isinstance(many, list) and len(many) == 3
    assert [o["index"] for o in many] == [0, 1, 2]
    # A streamed batch: each event names its prompt; each prompt's events end finished.
    events = stream(server, {"text": prompts[:2], "sampling_params": {"max_new_tokens": 4,
                                                                      **GREEDY}})
    for k in (0, 1):
        mine = [e for e in events if e["index"] == k]
        assert mine[-1]["text"] == singles[k]["text"][: len(mine[-1]["text"])]
        assert mine[-1]["meta_info"]["completion_tokens"] == 4


def test_no_stop_trim_keeps_the_stop_string(server: Server) -> None:
    text = gen(server, {"text": STEM, "sampling_params": {"max_new_tokens": 12,
                                                           **GREEDY}})["text"]
    if len(text) < 6:
        pytest.skip("greedy text too short to cut")
    stop = text[3:5]
    sp = {"max_new_tokens": 12, "stop": stop, **GREEDY}
    cut = gen(server, {"text": STEM, "sampling_params": sp})
    kept = gen(server, {"text": STEM, "sampling_params": {**sp, "no_stop_trim": True}})
    assert cut["text"] == text[: text.index(stop)]
    assert kept["text"] == cut["text"] + stop
    assert kept["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_output_logprobs_match_the_openai_endpoint(server: Server) -> None:
    prompt = "The capital of France is"
    out = gen(server, {"text": prompt, "sampling_params": {"max_new_tokens": 6, **GREEDY},
                       "return_logprob": True, "top_logprobs_num": 2,
                       "return_text_in_logprobs": True})
    meta = out["meta_info"]
    rows = meta["output_token_logprobs"]
    assert len(rows) == meta["completion_tokens"] == 6
    assert [r[1] for r in rows] == out["output_ids"]
    assert meta["input_token_logprobs"] == [], "no logprob_start_len: output rows only"
    ref = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": 6, "logprobs": 2, **GREEDY}).json()["choices"][0]
    lp = ref["logprobs"]
    assert [r[2] for r in rows] == lp["tokens"]
    assert [r[0] for r in rows] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    for pos, top in zip(meta["output_top_logprobs"], rows):
        assert len(pos) == 2 and pos[0][0] >= pos[1][0]
        assert pos[0][1] == top[1], "greedy: the chosen token is the most likely"
    no_text = gen(server, {"text": prompt, "sampling_params": {"max_new_tokens": 2, **GREEDY},
                           "return_logprob": True})
    assert all(r[2] is None for r in no_text["meta_info"]["output_token_logprobs"])


def test_input_logprob_window(server: Server) -> None:
    text = STEM + "Pages"
    full = gen(server, {"text": text, "sampling_params": {"max_new_tokens": 1,
                                                           "prompt_logprobs": True}})
    every = full["meta_info"]["input_token_logprobs"]  # one row per prompt token
    n = len(every)
    start = n - 6
    out = gen(server, {"text": [text], "sampling_params": {"max_new_tokens": 0},
                       "return_logprob": True, "logprob_start_len": start,
                       "top_logprobs_num": 3, "return_text_in_logprobs": True})[0]
    rows, tops = out["meta_info"]["input_token_logprobs"], out["meta_info"]["input_top_logprobs"]
    assert len(rows) == len(tops) == n - start
    assert [r[1] for r in rows] == [r[1] for r in every[start:]]
    assert rows[0][0] is None and tops[0] is None, "the window's first row has no logprob"
    assert all(isinstance(r[2], str) for r in rows)
    for j in range(1, len(rows)):
        assert rows[j][0] == pytest.approx(every[start + j][0], abs=1e-4)
        assert len(tops[j]) == 3 and tops[j][0][0] >= rows[j][0] - 1e-5
    r = httpx.post(server.url + "/generate", timeout=60, json={
        "text": text, "return_logprob": True, "logprob_start_len": n + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprob_start_len"


def test_every_stream_event_has_the_token_counts(server: Server) -> None:
    events = stream(server, {"text": STEM, "sampling_params": {"max_new_tokens": 8, **GREEDY}})
    final = events[-1]["meta_info"]
    assert final["completion_tokens"] == 8 and final["finish_reason"]["type"] == "length"
    for e in events:
        assert e["meta_info"]["prompt_tokens"] == final["prompt_tokens"] > 0
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    done = [e["meta_info"]["completion_tokens"] for e in events]
    assert done == sorted(done)
    again = stream(server, {"text": STEM, "sampling_params": {"max_new_tokens": 2, **GREEDY}})
    assert all(e["meta_info"]["cached_tokens"] > 0 for e in again)


def test_min_new_tokens_holds_back_eos(server: Server) -> None:
    sp = {"max_new_tokens": 10, "temperature": 0, "logit_bias": {str(EOS_ID): 100}}
    assert gen(server, {"text": "Hi", "sampling_params": sp})["meta_info"][
        "completion_tokens"] == 0
    held = gen(server, {"text": "Hi", "sampling_params": {**sp, "min_new_tokens": 4}})
    assert held["meta_info"]["completion_tokens"] == 4
    assert held["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS_ID}


def test_abort_request_by_rid(server: Server) -> None:
    body = {"text": "Count", "rid": "abort-me", "stream": True,
            "sampling_params": {"max_new_tokens": 1500, **GREEDY}}
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as r:
        lines = r.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: "))
        assert json.loads(first[6:])["meta_info"]["id"] == "abort-me"
        ack = httpx.post(server.url + "/abort_request", json={"rid": "abort-me"}, timeout=10)
        assert ack.json() == {"aborted": ["abort-me"]}
        events = [json.loads(ln[6:]) for ln in lines
                  if ln.startswith("data: ") and ln != "data: [DONE]"]
    last = events[-1]["meta_info"]
    assert last["finish_reason"]["type"] == "abort" and last["completion_tokens"] < 1500
    gone = httpx.post(server.url + "/abort_request", json={"rid": "abort-me"}, timeout=10)
    assert gone.json() == {"aborted": []}
    # The rid is free again once its request ended.
    assert gen(server, {"text": "Count", "rid": "abort-me",
                        "sampling_params": {"max_new_tokens": 1}})["meta_info"]["id"] == \
        "abort-me"


def test_stop_regex_ends_the_text_at_its_match(server: Server) -> None:
    text = gen(server, {"text": STEM, "sampling_params": {"max_new_tokens": 16,
                                                           **GREEDY}})["text"]
    words = [w for w in text.split() if w.isalnum()]
    if not words:
        pytest.skip("no word to match in the greedy text")
    pattern = f"{words[0]}\\b"  # ends with the token that completes the word
    out = gen(server, {"text": STEM, "sampling_params": {"max_new_tokens": 16,
                                                          "stop_regex": [pattern], **GREEDY}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    assert text.startswith(out["text"]) and words[0] in out["text"], "kept whole (SGLang)"
    assert out["meta_info"]["completion_tokens"] < 16 or out["text"] == text
    streamed = stream(server, {"text": STEM, "sampling_params": {
        "max_new_tokens": 16, "stop_regex": pattern, **GREEDY}})
    assert streamed[-1]["text"] == out["text"]


def test_sglang_defaults_accepted(server: Server) -> None:
    sp = {"max_new_tokens": 3, "min_new_tokens": 0, "stop_regex": [], "regex": None,
          "json_schema": None, "spaces_between_special_tokens": True, "no_stop_trim": False,
          "top_k": 1 << 30, "stream_interval": None, "custom_params": None, "n": 1,
          "sampling_seed": 3}
    out = gen(server, {"text": "Hi", "sampling_params": sp, "lora_path": None,
                       "return_logprob": False, "logprob_start_len": -1, "image_data": None})
    assert out["meta_info"]["completion_tokens"] <= 3


@pytest.mark.parametrize("body,param", [
    ({"sampling_params": {"stop_regex": ["(unclosed"]}}, "stop_regex"),
    ({"sampling_params": {"structural_tag": "{}"}}, "structural_tag"),
    ({"sampling_params": {"custom_params": {"a": 1}}}, "custom_params"),
    ({"sampling_params": {"stream_interval": 4}}, "stream_interval"),
    ({"sampling_params": {"skip_special_tokens": False,
                          "spaces_between_special_tokens": True}},
     "spaces_between_special_tokens"),
    ({"sampling_params": {"min_new_tokens": 9, "max_new_tokens": 3}}, "min_new_tokens"),
    ({"sampling_params": {"bogus": 1}}, "sampling_params"),
    ({"image_data": "http://x/cat.png"}, "image_data"),
    ({"lora_path": "adapter"}, "lora_path"),
    ({"token_ids_logprob": [1, 2]}, "token_ids_logprob"),
    ({"return_hidden_states": True}, "return_hidden_states"),
    ({"return_logprob": True, "top_logprobs_num": 50}, "top_logprobs_num"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params"),
    ({"text": ["a", "b"], "rid": ["x", "x"]}, "rid"),
])
def test_unsupported_is_400_naming_it(server: Server, body: dict[str, Any], param: str) -> None:
    r = httpx.post(server.url + "/generate", json={"text": "Hi", **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split("_")[0] in err["message"], err
