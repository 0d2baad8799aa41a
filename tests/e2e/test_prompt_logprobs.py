"""Prompt logprobs over native /generate: ``meta_info.input_token_logprobs`` rows equal the
in-process Engine's, ``logprob_start_len`` lets the cached stem skip recomputation, and a bad
``logprob_start_len`` is a 400 naming it."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from radixrt import Engine, SamplingParams
from tests.e2e.conftest import Server

PAGE = 16
PROMPT = "The radix cache keeps every prefix it has seen, page by page, until memory runs out."
STEM = "A radix tree shares common prefixes, so cached pages can be reused. " * 3


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Any) -> Any:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def server(server_factory: Any, model_dir: Any) -> Server:
    return server_factory(model_dir, "--page-size", str(PAGE))


@pytest.fixture(scope="module")
def engine(model_dir: Any) -> Engine:
    return Engine(str(model_dir), page_size=PAGE)


def generate(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/generate", json=body, timeout=60)


def reference(engine: Engine, text: str) -> tuple[list[int], list[float | None]]:
    """Prompt ids and logprobs of every prompt token, computed without the cache."""
    engine.flush_cache()
    out = engine.generate(text, SamplingParams(max_new_tokens=1, temperature=0,
                                               prompt_logprobs=True))[0]
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    return list(out.prompt_token_ids), list(out.prompt_logprobs)


def assert_rows_match(rows: list[list[Any]], ids: list[int], lps: list[float | None],
                      start: int) -> None:
    assert [r[1] for r in rows] == ids, "one [logprob, token_id] row per prompt token"
    assert rows[0][0] is None, "nothing precedes the first token, so it has no logprob"
    for k in range(max(start, 1), len(ids)):
        assert rows[k][0] == pytest.approx(lps[k], abs=1e-4), f"prompt token {k}"


def test_generate_returns_engine_prompt_logprobs(server: Server, engine: Engine) -> None:
    ids, lps = reference(engine, PROMPT)
    sp = {"max_new_tokens": 2, "temperature": 0, "prompt_logprobs": True}
    r = generate(server, {"text": PROMPT, "sampling_params": sp})
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert meta["prompt_tokens"] == len(ids)
    assert_rows_match(meta["input_token_logprobs"], ids, lps, start=0)
    # Without prompt_logprobs the key is absent (nothing computed, nothing sent).
    r = generate(server, {"text": PROMPT, "sampling_params": {"max_new_tokens": 1}})
    assert "input_token_logprobs" not in r.json()["meta_info"]
    # By token ids, n=2: every sample reports the same prompt rows.
    r = generate(server, {"input_ids": ids, "sampling_params": {**sp, "n": 2}})
    assert r.status_code == 200, r.text
    outs = r.json()
    assert len(outs) == 2
    for out in outs:
        assert_rows_match(out["meta_info"]["input_token_logprobs"], ids, lps, start=0)


def test_start_after_a_cached_stem_reuses_it(server: Server, engine: Engine) -> None:
    full = STEM + "Which pages stay?"
    ids, lps = reference(engine, full)
    stem_len = len(engine.encode(STEM))
    assert stem_len > 3 * PAGE
    r = generate(server, {"text": STEM, "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 200, r.text
    start = stem_len - 4
    sp = {"max_new_tokens": 1, "temperature": 0, "prompt_logprobs": True,
          "logprob_start_len": start}
    meta = generate(server, {"text": full, "sampling_params": sp}).json()["meta_info"]
    # The cache may cover only tokens before start - 1 (row start - 1 predicts token start).
    cached = meta["cached_tokens"]
    assert cached == (start - 1) // PAGE * PAGE, (cached, start)
    rows = meta["input_token_logprobs"]
    assert all(r[0] is None for r in rows[: cached + 1]), "cached tokens are not scored"
    assert_rows_match(rows, ids, lps, start=start)


def test_streaming_sends_prompt_logprobs_on_the_last_event(server: Server,
                                                           engine: Engine) -> None:
    ids, lps = reference(engine, PROMPT)
    sp = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True, "prompt_logprobs": True}
    events = []
    with httpx.stream("POST", server.url + "/generate", timeout=60,
                      json={"text": PROMPT, "sampling_params": sp, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert len(events) >= 2 and events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all("input_token_logprobs" not in e["meta_info"] for e in events[:-1])
    assert_rows_match(events[-1]["meta_info"]["input_token_logprobs"], ids, lps, start=0)


@pytest.mark.parametrize("sp,param", [
    ({"prompt_logprobs": True, "logprob_start_len": -1}, "logprob_start_len"),
    ({"prompt_logprobs": True, "logprob_start_len": 1.5}, "logprob_start_len"),
    ({"prompt_logprobs": True, "logprob_start_len": "3"}, "logprob_start_len"),
    ({"prompt_logprobs": True, "logprob_start_len": True}, "logprob_start_len"),
    ({"prompt_logprobs": "yes"}, "prompt_logprobs"),
])
def test_bad_values_are_400_naming_the_field(server: Server, sp: dict[str, Any],
                                             param: str) -> None:
    r = generate(server, {"text": PROMPT, "sampling_params": {"max_new_tokens": 1, **sp}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
