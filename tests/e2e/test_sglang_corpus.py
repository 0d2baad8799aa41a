"""Replay the requests SGLang's own frontend sends (recorded with the real ``sglang`` package,
tests/fixtures/sglang_corpus/record.py) against a radixrt server on a tiny model, and check
each response has what SGLang's frontend reads, in the shapes it reads them.

Each request is tagged with the server features it needs (the test id names them):
  model_info    GET /get_model_info (model_path; chat_template for radixrt's own DSL)
  server_info   GET /server_info
  flush         POST /flush_cache
  sglang_keys   sampling keys SGLang always sends (min_new_tokens, stop_regex, n,
                spaces_between_special_tokens, regex/json_schema null ...)
  prefill_only  max_new_tokens 0 (select / fork / run_batch cache a prefix this way)
  batch_text    "text" as a list (select scores every choice in one request)
  batch_ids     "input_ids" as a list of lists (unconditional_likelihood_normalized)
  logprobs      return_logprob / logprob_start_len / top_logprobs_num /
                return_text_in_logprobs with SGLang's meta_info rows
  grammar       regex / json_schema
  stream        SSE with cumulative text, meta_info in every event
  bench_keys    bench_serving's top-level keys (lora_path null, return_routed_experts false,
                logprob_start_len -1)
  reset_cache   POST /reset_prefix_cache (vLLM's; bench_serving --backend vllm --flush-cache)
  openai        /v1/models, /v1/completions, /v1/chat/completions as bench_serving sends them
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "sglang_corpus"
PROGRAMS = sorted(p.stem for p in CORPUS.glob("*.json"))


def features(req: dict[str, Any]) -> list[str]:
    path, body = req["path"].split("?")[0], req["body"] or {}
    if path == "/get_model_info":
        return ["model_info"]
    if path in ("/server_info", "/get_server_info"):
        return ["server_info"]
    if path == "/flush_cache":
        return ["flush"]
    if path == "/reset_prefix_cache":
        return ["reset_cache"]
    if path.startswith("/v1/"):
        return ["openai"] + (["stream"] if body.get("stream") else [])
    sp = body.get("sampling_params") or {}
    out = []
    if "lora_path" in body or "return_routed_experts" in body:
        out.append("bench_keys")
    if "min_new_tokens" in sp or "stop_regex" in sp:
        out.append("sglang_keys")
    if sp.get("max_new_tokens") == 0:
        out.append("prefill_only")
    if isinstance(body.get("text"), list):
        out.append("batch_text")
    if isinstance(body.get("input_ids"), list) and body["input_ids"] and isinstance(
            body["input_ids"][0], list):
        out.append("batch_ids")
    if body.get("return_logprob"):
        out.append("logprobs")
    if sp.get("regex") is not None or sp.get("json_schema") is not None:
        out.append("grammar")
    if body.get("stream"):
        out.append("stream")
    return out


def load(program: str) -> list[dict[str, Any]]:
    doc = json.loads((CORPUS / f"{program}.json").read_text())
    assert doc["requests"], f"{program}: empty recording"
    return list(doc["requests"])


def test_corpus_covers_the_frontend() -> None:
    """The recording exercises every feature above (a re-recording that lost one fails)."""
    seen = {f for p in PROGRAMS for r in load(p) for f in features(r)}
    assert seen >= {"model_info", "server_info", "flush", "sglang_keys", "prefill_only",
                    "batch_text", "batch_ids", "logprobs", "grammar", "stream", "bench_keys",
                    "reset_cache", "openai"}, seen


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Any) -> Any:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def server(server_factory: Any, model_dir: Any) -> Server:
    return server_factory(model_dir, "--page-size", "16")


def _check_rows(rows: Any, n: int | None, with_text: bool, what: str) -> None:
    assert isinstance(rows, list), f"{what}: {rows!r}"
    if n is not None:
        assert len(rows) == n, f"{what}: {len(rows)} rows, want {n}"
    for r in rows:
        assert isinstance(r, list) and len(r) >= 2, f"{what}: row {r!r}"
        assert r[0] is None or isinstance(r[0], float), f"{what}: logprob {r[0]!r}"
        assert isinstance(r[1], int) and not isinstance(r[1], bool), f"{what}: id {r[1]!r}"
        if with_text:
            assert len(r) >= 3 and isinstance(r[2], str), f"{what}: text of {r!r}"


def check_output(body: dict[str, Any], obj: Any, final: bool = True) -> None:
    """One /generate result object: what SGLang's RuntimeEndpoint and programs read."""
    assert isinstance(obj, dict) and isinstance(obj.get("text"), str), obj
    meta = obj["meta_info"]
    prompt, done = meta["prompt_tokens"], meta["completion_tokens"]
    assert isinstance(prompt, int) and prompt > 0, meta
    assert isinstance(done, int) and done >= 0 and isinstance(meta["cached_tokens"], int), meta
    sp = body.get("sampling_params") or {}
    if sp.get("max_new_tokens") == 0:
        assert done == 0 and obj["text"] == "", "max_new_tokens 0 generates nothing"
    if final:
        assert "finish_reason" in meta
        limit = sp.get("max_new_tokens", 128)
        assert done <= limit, (done, limit)
    if not body.get("return_logprob"):
        return
    with_text = bool(body.get("return_text_in_logprobs"))
    start = body.get("logprob_start_len")
    rows = meta["input_token_logprobs"]
    if start is None or start == -1:  # SGLang then returns no input rows
        assert len(rows) in (0, prompt), rows
        _check_rows(rows, None, with_text, "input_token_logprobs")
    else:
        _check_rows(rows, prompt - start, with_text, "input_token_logprobs")
        if start == 0:
            assert rows[0][0] is None, "the first prompt token has no logprob"
    if final:
        _check_rows(meta["output_token_logprobs"], done, with_text, "output_token_logprobs")
    k = body.get("top_logprobs_num") or 0
    if k and final:
        tops = meta["output_top_logprobs"]
        assert isinstance(tops, list) and len(tops) == done, tops
        for pos in tops:
            _check_rows(pos, k, with_text, "output_top_logprobs")


def adapt(req: dict[str, Any], prev: list[Any]) -> dict[str, Any]:
    """Values SGLang's frontend derives from the previous response are derived again from
    this server's (the recording's capture server tokenized differently): select's
    logprob_start_len (stem tokens - 2) and the unconditional pass's token ids."""
    body = json.loads(json.dumps(req["body"]))
    if "model" in body:  # bench_serving names the model it was given: this server's
        body["model"] = MODEL_NAME[0]
    if isinstance(body.get("text"), list) and "logprob_start_len" in body and prev:
        stem = prev[-1]
        body["logprob_start_len"] = max(stem["meta_info"]["prompt_tokens"] - 2, 0)
    if "batch_ids" in features(req) and prev:
        choice_rows = [r["meta_info"]["input_token_logprobs"] for r in prev[-1]]
        body["input_ids"] = [[row[1] for row in rows] for rows in choice_rows]
    return body


MODEL_NAME: list[str] = []  # the server's model id, read once


def replay(server: Server, req: dict[str, Any], prev: list[Any]) -> Any:
    if not MODEL_NAME:
        MODEL_NAME.append(httpx.get(server.url + "/v1/models").json()["data"][0]["id"])
    body = adapt(req, prev) if req["body"] is not None else None
    url = server.url + req["path"]
    if body and body.get("stream") and req["path"].startswith("/v1/"):
        return replay_openai_stream(url, body)
    if body and body.get("stream"):
        return replay_stream(url, body)
    r = httpx.request(req["method"], url, json=body, timeout=120)
    assert r.status_code == 200, f"{req['method']} {req['path']} -> {r.status_code}: {r.text}"
    out = r.json()
    if req["path"] == "/get_model_info":
        assert isinstance(out["model_path"], str) and out["model_path"]
        assert isinstance(out["chat_template"], str) and "messages" in out["chat_template"]
    elif req["path"] in ("/server_info", "/get_server_info"):
        assert isinstance(out, dict) and out
    elif req["path"] == "/v1/models":
        assert out["data"] and isinstance(out["data"][0]["id"], str)
    elif req["path"] == "/generate":
        assert body is not None
        prompts = body.get("text", body.get("input_ids"))
        batched = isinstance(prompts, list) and bool(prompts) and not isinstance(prompts[0], int)
        if batched:
            assert isinstance(out, list) and len(out) == len(prompts), out
            for obj in out:
                check_output(body, obj)
        else:
            check_output(body, out)
    return out


def replay_openai_stream(url: str, body: dict[str, Any]) -> Any:
    """bench_serving's vllm / sglang-oai-chat modes: SSE chunks with choices, then [DONE]."""
    chunks, done = [], False
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:"):
                if line.strip() == "data: [DONE]":
                    done = True
                    break
                chunks.append(json.loads(line[5:].strip()))
    assert done and chunks, "a stream ends with data: [DONE]"
    key = "delta" if "messages" in body else "text"
    assert any(c["choices"] and key in c["choices"][0] for c in chunks), chunks
    return chunks[-1]


def replay_stream(url: str, body: dict[str, Any]) -> Any:
    events, done = [], False
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            if line.strip() == "data: [DONE]":
                done = True
                break
            events.append(json.loads(line[5:].strip()))
    assert done and events, "a stream ends with data: [DONE]"
    texts = [e["text"] for e in events]
    # SGLang's frontend slices each event's text by what it has already shown.
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts
    for e in events[:-1]:
        check_output(body, e, final=False)
    check_output(body, events[-1])
    return events[-1]


@pytest.mark.parametrize("program", PROGRAMS)
def test_replay(server: Server, program: str) -> None:
    prev: list[Any] = []
    for i, req in enumerate(load(program)):
        tags = ",".join(features(req)) or "plain"
        try:
            prev.append(replay(server, req, prev))
        except AssertionError as e:
            raise AssertionError(f"{program} request {i} [{tags}]: {e}") from None
