"""The router app in process (no worker): limits, hostile bodies, error shapes, admin and metrics
keys, the cache namespace, and tokenization off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from radixrt.server.config import ServerConfig
from radixrt.server.metrics import ServerMetrics
from radixrt.server.protocol import ModelLimits
from radixrt.server.router import _namespace, build_app
from radixrt.server.serving import ServingContext
from radixrt.server.tokenization import TextCodec
from tests.fixtures.tiny_models import build_tokenizer

TENANT, OTHER, ADMIN = "sk-tenant", "sk-other", "sk-admin"


class FakeClient:
    """What the router app touches on an EngineClient; nothing here reaches an engine."""

    def __init__(self) -> None:
        self.workers: list[Any] = []
        self.requests: dict[str, Any] = {}
        self.num_waiting = 0
        self.flushes = 0

    def healthy(self) -> tuple[bool, str]:
        return True, "ok"

    async def flush_cache(self) -> bool:
        self.flushes += 1
        return True

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("these requests must be refused before they reach the engine")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def make_ctx(tokenizer: Any, codec: TextCodec | None = None, **cfg: Any) -> ServingContext:
    config = ServerConfig(**{"api_keys": (TENANT, OTHER), "admin_api_keys": (ADMIN,), **cfg})
    return ServingContext(config, FakeClient(), codec or TextCodec(tokenizer),  # type: ignore[arg-type]
                          ServerMetrics(), ModelLimits(512, 256), ("tiny",))


def run(ctx: ServingContext, *calls: tuple[str, str, dict[str, Any]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=build_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return [await c.request(method, path, **kw) for method, path, kw in calls]

    return asyncio.run(go())


def auth(key: str = TENANT) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(path: str, body: Any = None, raw: bytes | None = None, key: str = TENANT,
         **kw: Any) -> tuple[str, str, dict[str, Any]]:
    content = raw if raw is not None else json.dumps(body).encode()
    return ("POST", path, {"content": content, "headers": {**auth(key), **kw.pop("headers", {})},
                           **kw})


def assert_error(r: httpx.Response, status: int, param: str | None = "*",
                 needle: str = "") -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    if param != "*":
        assert err["param"] == param, err
    assert needle in err["message"], err


CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def ctx(tokenizer: Any) -> ServingContext:
    return make_ctx(tokenizer)


@pytest.mark.parametrize("path,body,param,needle", [
    (CHAT, {"messages": MSGS, "seed": 2**64 - 1, "n": 2}, "seed", "seed"),
    (CHAT, {"messages": MSGS, "seed": 2**70}, "seed", "seed"),
    (CHAT, {"messages": MSGS, "seed": -1}, "seed", "seed"),
    (CHAT, {"messages": MSGS, "top_k": 2**70}, "top_k", "top_k"),
    (CHAT, {"messages": MSGS, "top_logprobs": 2**70, "logprobs": True}, "top_logprobs", ""),
    (CHAT, {"messages": MSGS, "max_tokens": 2**70}, "max_tokens", ""),
    (CHAT, {"messages": MSGS, "n": 2**70}, "n", ""),
    (CHAT, {"messages": MSGS, "temperature": 1e-300}, "temperature", "greedy"),
    (CHAT, {"messages": MSGS, "repetition_penalty": 1e-300}, "repetition_penalty", ""),
    (CHAT, {"messages": MSGS, "stop": ["x" * 5000]}, "stop", "stop"),
    (CHAT, {"messages": MSGS, "chat_template": "{{ 1 }}"}, "chat_template", "allow-request"),
    (CHAT, {"messages": MSGS, "chat_template_kwargs": {"chat_template": "x"}}, "chat_template",
     ""),
    ("/v1/completions", {"prompt": ["a"] * 200, "n": 64}, "n", "sequences"),
    ("/v1/completions", {"prompt": [[1, 2]] * 257}, "prompt", "sequences"),
    ("/v1/completions", {"prompt": "a", "logprobs": 2**70}, "top_logprobs", ""),
    ("/generate", {"text": "a", "sampling_params": {"seed": 2**70}}, "seed", ""),
    ("/generate", {"text": "a", "sampling_params": {"top_k": 2**70}}, "top_k", ""),
    ("/generate", {"text": "a", "sampling_params": {"logprob_start_len": 2**70}},
     "logprob_start_len", ""),
    ("/generate", {"text": "a", "sampling_params": {"temperature": 1e999}}, "temperature", ""),
    ("/generate", {"text": "a", "sampling_params": {"stop_token_ids": [2**70]}},
     "stop_token_ids", ""),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 2**70}}, "max_tokens",
     ""),
])
def test_out_of_range_values_are_400s_naming_the_field(ctx: ServingContext, path: str,
                                                         body: Any, param: str,
                                                         needle: str) -> None:
    (r,) = run(ctx, post(path, body))
    assert_error(r, 400, param, needle)


@pytest.mark.parametrize("raw,param,needle", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature",
     "finite"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', "top_p",
     "finite"),
    (b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', "content", "surrogate"),
    (b'{"messages": [{"role": "user", "content": "a\\udc00b"}]}', "content", "surrogate"),
    (b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', None, "UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, None, "deeper"),
    (b'{"messages": ' + b"[" * 100_000, None, "deeper"),
    (b'{"messages": [{"role": "user", "content": "' + b"[" * 100_000 + b'"}]' + b"}" * 3,
     None, "Malformed"),
])
def test_hostile_json_is_a_400_never_a_500(ctx: ServingContext, raw: bytes, param: str | None,
                                           needle: str) -> None:
    (r,) = run(ctx, post(CHAT, raw=raw))
    assert_error(r, 400, param, needle)


def test_brackets_inside_strings_are_not_nesting(ctx: ServingContext) -> None:
    # 1,000 brackets of text are content, not depth: the request gets as far as the length
    # check (a 400 about the prompt, from a body that parsed fine).
    msgs = [{"role": "user", "content": "[" * 1000 + "{"}]
    (r,) = run(ctx, post(CHAT, {"messages": msgs, "max_tokens": 10**6}))
    assert_error(r, 400, "prompt", "context length")


def test_body_size_limit_is_a_413(tokenizer: Any) -> None:
    ctx = make_ctx(tokenizer, max_request_bytes=64 * 1024)
    big = json.dumps({"prompt": "x" * (65 * 1024)}).encode()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r1, r2, r3 = run(ctx, post("/v1/completions", raw=big),
                     ("POST", "/v1/completions", {"content": chunks(), "headers": auth()}),
                     post("/v1/completions", {"prompt": "x", "max_tokens": 0}))
    assert_error(r1, 413, None, "limit")
    assert_error(r2, 413, None, "limit")
    assert_error(r3, 400, "max_tokens")  # the next request on the same client still works


def test_404_405_are_openai_style(ctx: ServingContext) -> None:
    r404, r405 = run(ctx, ("GET", "/v1/nothing", {"headers": auth()}),
                     ("GET", CHAT, {"headers": auth()}))
    assert_error(r404, 404, None, "/v1/nothing")
    assert r404.json()["error"]["type"] == "not_found_error"
    assert_error(r405, 405, None, "GET")


def test_admin_endpoints_need_the_admin_key(tokenizer: Any) -> None:
    ctx = make_ctx(tokenizer)
    tenant, anon, admin = run(ctx, post("/flush_cache", raw=b""),
                              ("POST", "/flush_cache", {}),
                              post("/flush_cache", raw=b"", key=ADMIN))
    assert_error(tenant, 403, None, "admin")
    assert tenant.json()["error"]["type"] == "permission_error"
    assert_error(anon, 401)
    assert admin.status_code == 200 and admin.json() == {"flushed": True}
    assert ctx.client.flushes == 1  # type: ignore[attr-defined]
    # Tenant keys but no admin key: nobody may flush everyone's cache.
    no_admin = make_ctx(tokenizer, admin_api_keys=())
    (r,) = run(no_admin, post("/flush_cache", raw=b""))
    assert_error(r, 403, None, "--admin-api-key")
    # No keys at all: a local, open server.
    (r,) = run(make_ctx(tokenizer, api_keys=(), admin_api_keys=()), ("POST", "/flush_cache", {}))
    assert r.status_code == 200


def test_metrics_key(tokenizer: Any) -> None:
    open_ctx = make_ctx(tokenizer)
    (r,) = run(open_ctx, ("GET", "/metrics", {}))
    assert r.status_code == 200 and "radixrt_router_waiting_requests 0" in r.text
    ctx = make_ctx(tokenizer, metrics_require_key=True)
    anon, tenant, admin, health = run(ctx, ("GET", "/metrics", {}),
                                      ("GET", "/metrics", {"headers": auth()}),
                                      ("GET", "/metrics", {"headers": auth(ADMIN)}),
                                      ("GET", "/health", {}))
    assert_error(anon, 401)
    assert tenant.status_code == 200 and admin.status_code == 200
    assert health.status_code == 200  # probes stay open


def test_config_refuses_key_options_without_keys() -> None:
    for flag in ("metrics_require_key", "salt_from_key"):
        with pytest.raises(ValueError, match="api keys"):
            ServerConfig(**{flag: True})
    with pytest.raises(ValueError, match="admin"):
        ServerConfig(api_keys=("a",), admin_api_keys=("a",))


def test_namespace_binds_salt_to_key(tokenizer: Any) -> None:
    def ns(ctx: ServingContext, key: str | None, salt: str | None) -> str | None:
        request = SimpleNamespace(state=SimpleNamespace(api_key=key))
        return _namespace(ctx, request, salt)  # type: ignore[arg-type]

    one_key = make_ctx(tokenizer, api_keys=(TENANT,), admin_api_keys=())
    # One key, no binding: the salt alone is the namespace (anyone sending it shares it).
    assert ns(one_key, TENANT, "s") == "salt:s"
    bound = make_ctx(tokenizer, api_keys=(TENANT,), admin_api_keys=(ADMIN,), salt_from_key=True)
    a, b = ns(bound, TENANT, "s"), ns(bound, ADMIN, "s")
    assert a is not None and b is not None and a != b and a.endswith("|salt:s")
    assert TENANT not in a  # the namespace carries a hash, never the key
    assert ns(bound, TENANT, None) != ns(bound, TENANT, "s")
    two_keys = make_ctx(tokenizer)
    assert ns(two_keys, TENANT, "s") != ns(two_keys, OTHER, "s")


def test_tokenization_runs_off_the_event_loop(tokenizer: Any) -> None:
    """While one request's prompt is being tokenized, /health still answers: the tokenizer
    is held inside encode() until the health check has come back."""
    entered, release = threading.Event(), threading.Event()
    released: list[bool] = []

    class HeldCodec(TextCodec):
        def encode(self, text: str) -> list[int]:
            entered.set()
            released.append(release.wait(20))  # False: nobody got to release it (loop stuck)
            return super().encode(text)

    ctx = make_ctx(tokenizer, HeldCodec(tokenizer))

    async def go() -> tuple[int, bool, int]:
        transport = httpx.ASGITransport(app=build_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            slow = asyncio.ensure_future(c.post("/v1/completions", headers=auth(),
                                                json={"prompt": "hello", "max_tokens": 10**6}))
            await asyncio.get_running_loop().run_in_executor(None, entered.wait, 20)
            health = await c.get("/health")
            slow_done = slow.done()
            release.set()
            return health.status_code, slow_done, (await slow).status_code

    health, slow_done_first, slow_status = asyncio.run(go())
    assert health == 200 and not slow_done_first
    assert released == [True], "encode() blocked the event loop: /health could not answer"
    assert slow_status == 400
