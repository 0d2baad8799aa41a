"""Hostile input against one real server: a corpus of known server-killers and hypothesis over
the three request schemas. Every answer is a 200, or a 400 / 413 with an OpenAI-style error body,
never a 5xx or a dropped keep-alive connection; afterwards the server is healthy, the same
worker still serves, and the router's and the worker's queues and pages are back to idle."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.e2e.conftest import API_KEY, Server
from tests.fixtures.hostile_requests import CHAT, COMPLETIONS, GENERATE, requests

ADMIN_KEY = "sk-admin-test"
MSGS = [{"role": "user", "content": "hi"}]
# A client template whose loops run ~10^10 times: only the deadline can end it.
HUGE_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def server(server_factory: Any, tiny_model_dir: Any) -> Server:
    return server_factory(tiny_model_dir("llama"), "--page-size", "16", "--admin-api-key",
                          ADMIN_KEY, "--allow-request-chat-template",
                          "--chat-template-timeout", "1", "--salt-from-key",
                          "--metrics-require-key", api_key=API_KEY)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    """One keep-alive connection for everything: a bad request must not cost it."""
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as c:
        yield c


def send(http: httpx.Client, path: str, body: Any = None, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return http.post(path, content=content, headers={"Content-Type": "application/json"})


def assert_refused(r: httpx.Response, status: int = 400, param: str | None = "*") -> None:
    assert r.status_code == status, r.text[:500]
    assert r.headers.get("connection", "").lower() != "close", "the refusal closed keep-alive"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    assert isinstance(err["message"], str) and err["message"], err
    if param != "*":
        assert err["param"] == param, err


def assert_ok_or_refused(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text[:500]
    if r.status_code != 200:
        assert_refused(r, r.status_code)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-300:]
        objs = [json.loads(e) for e in events[:-1]]
        errors = [o["error"] for o in objs if isinstance(o, dict) and "error" in o]
        assert not errors, errors  # a stream that started must not end in an error


def metrics(http: httpx.Client) -> dict[str, float]:
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(http: httpx.Client) -> dict[str, float]:
    """Metrics once the router and the worker report nothing waiting, running or held
    (worker stats arrive with its pongs, a moment after the last request)."""
    keys = ("radixrt_router_waiting_requests", "radixrt_router_in_flight_requests",
            'radixrt_running_requests{worker="0"}', 'radixrt_queued_requests{worker="0"}',
            'radixrt_kv_pages{worker="0",state="locked"}',
            'radixrt_kv_pages{worker="0",state="private"}')
    deadline = time.monotonic() + 60
    while True:
        m = metrics(http)
        if all(m.get(k) == 0 for k in keys) or time.monotonic() > deadline:
            return {k: m.get(k, -1) for k in keys}
        time.sleep(0.5)


def assert_healthy_and_idle(server: Server, http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    ok = send(http, COMPLETIONS, {"prompt": "still serving?", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    idle = wait_idle(http)
    assert all(v == 0 for v in idle.values()), f"not back to idle: {idle}"
    assert len(server.worker_pids()) == 1, "the worker died and was replaced"


CORPUS: list[tuple[str, str, Any, int, str | None]] = [
    ("seed 2^64-1 with n=2", CHAT, {"messages": MSGS, "seed": 2**64 - 1, "n": 2,
                                     "max_tokens": 2}, 400, "seed"),
    ("seed 2^70", GENERATE, {"text": "a", "sampling_params": {"seed": 2**70}}, 400, "seed"),
    ("top_k 2^70", GENERATE, {"text": "a", "sampling_params": {"top_k": 2**70}}, 400, "top_k"),
    ("logprob_start_len 2^70", GENERATE,
     {"text": "a", "sampling_params": {"prompt_logprobs": True, "logprob_start_len": 2**70}},
     400, "logprob_start_len"),
    ("200 prompts x n=64", COMPLETIONS, {"prompt": ["hi"] * 200, "n": 64, "max_tokens": 1},
     400, "n"),
    ("client template with a huge loop", CHAT, {"messages": MSGS, "chat_template": HUGE_LOOP},
     400, "chat_template"),
    ("max_tokens 2^70", COMPLETIONS, {"prompt": "a", "max_tokens": 2**70}, 400, "max_tokens"),
    ("negative max_tokens", COMPLETIONS, {"prompt": "a", "max_tokens": -5}, 400, "max_tokens"),
    ("negative n", CHAT, {"messages": MSGS, "n": -1}, 400, "n"),
    ("empty prompt", COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("long stop list", CHAT, {"messages": MSGS, "stop": [f"s{i}" for i in range(1000)]}, 400,
     "stop"),
]
RAW_CORPUS: list[tuple[str, str, bytes, int, str | None]] = [
    ("temperature NaN", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], '
     b'"temperature": NaN}', 400, "temperature"),
    ("temperature Infinity", COMPLETIONS, b'{"prompt": "hi", "temperature": Infinity}', 400,
     "temperature"),
    ("lone surrogate", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "content"),
    ("100,000-level nesting", CHAT, b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("unclosed 100,000-level nesting", GENERATE, b'{"text": ' + b"[" * 100_000, 400, None),
    ("10 MB body", CHAT, json.dumps({"messages": [{"role": "user", "content": "x" * 10_000_000}]})
     .encode(), 413, None),
    ("empty body", COMPLETIONS, b"", 400, None),
    ("not JSON", GENERATE, b"\xff\xfe{", 400, None),
]


def test_hostile_corpus_back_to_back(server: Server, http: httpx.Client) -> None:
    for name, path, body, status, param in CORPUS:
        r = send(http, path, body)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
        assert_refused(r, status, param)
    for name, path, raw, status, param in RAW_CORPUS:
        r = send(http, path, raw=raw)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
        assert_refused(r, status, param)
    for method, path, status in (("GET", "/nope", 404), ("GET", CHAT, 405)):
        assert_refused(http.request(method, path), status)
    assert_healthy_and_idle(server, http)


def test_salt_bound_to_key_and_metrics_key(server: Server, http: httpx.Client) -> None:
    # --salt-from-key: the admin key and the tenant key sending the same salt share nothing.
    body = {"prompt": list(range(10, 10 + 3 * 16 + 3)), "max_tokens": 1, "cache_salt": "s"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    send(http, COMPLETIONS, body)
    again = send(http, COMPLETIONS, body).json()["usage"]["prompt_tokens_details"]
    other = http.post(COMPLETIONS, json=body, headers=admin).json()["usage"]
    assert again["cached_tokens"] == 3 * 16
    assert other["prompt_tokens_details"]["cached_tokens"] == 0
    # --metrics-require-key: no key, no metrics; /health stays open.
    assert_refused(httpx.get(server.url + "/metrics"), 401)
    assert httpx.get(server.url + "/health").status_code == 200
    assert "radixrt_router_in_flight_requests" in metrics(http)


def test_admin_and_client_template(server: Server, http: httpx.Client) -> None:
    assert_refused(http.post("/flush_cache"), 403)  # a tenant key may not flush everyone
    r = http.post("/flush_cache", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    # The deadline killed the runaway template's renderer; a sane one still renders.
    tpl = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    ok = send(http, CHAT, {"messages": MSGS, "chat_template": tpl, "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] > 0


# ---------------------------------------------------------------------------- hypothesis


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=requests)
def test_fuzz_request_schemas(server: Server, http: httpx.Client, req: tuple[str, Any]) -> None:
    path, body = req
    r = send(http, path, raw=json.dumps(body, allow_nan=True).encode())
    assert_ok_or_refused(r)


def test_idle_after_fuzzing(server: Server, http: httpx.Client) -> None:
    assert_healthy_and_idle(server, http)
