"""The SGLang-native routes in process (no worker): who may reset the cache or abort whose
request, and what /get_model_info and /server_info tell (never a key)."""

from __future__ import annotations

import weakref
from typing import Any

from radixrt.server.auth import key_tenant
from radixrt.server.serving import ActiveRequest
from tests.fixtures.tiny_models import CHATML_TEMPLATE, build_tokenizer
from tests.unit.test_router_app import ADMIN, OTHER, TENANT, assert_error, auth, make_ctx, post, run


class FakeGeneration:
    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort_by_client(self, engine_rid: str) -> None:
        self.aborted.append(engine_rid)


def test_reset_prefix_cache_needs_an_admin_key() -> None:
    ctx = make_ctx(build_tokenizer())
    tenant, admin = run(ctx, post("/reset_prefix_cache"), post("/reset_prefix_cache", key=ADMIN))
    assert_error(tenant, 403, needle="admin")
    assert admin.status_code == 200 and admin.json() == {"flushed": True}
    assert ctx.client.flushes == 1  # type: ignore[attr-defined]


def test_abort_reaches_only_the_callers_requests() -> None:
    ctx = make_ctx(build_tokenizer())
    mine, theirs = FakeGeneration(), FakeGeneration()
    for rid, gen, key, engine_rid in (("mine", mine, TENANT, "e1"), ("theirs", theirs, OTHER, "e2")):
        ctx.active[(key_tenant(key), rid)] = ActiveRequest(
            weakref.ref(gen), engine_rid, key_tenant(key))  # type: ignore[arg-type]
    r = run(ctx, post("/abort_request", {"rid": ["mine", "theirs", "nobody"]}),
            post("/abort_request", {"abort_all": True}),
            post("/abort_request", {"rid": "theirs"}, key=ADMIN),
            post("/abort_request", {}), post("/abort_request", {"rid": 3}))
    assert r[0].json() == {"aborted": ["mine"]} and r[1].json() == {"aborted": ["mine"]}
    assert r[2].json() == {"aborted": ["theirs"]}
    assert mine.aborted == ["e1", "e1"] and theirs.aborted == ["e2"]
    assert_error(r[3], 400, "rid")
    assert_error(r[4], 400, "rid")


def test_model_and_server_info_without_secrets() -> None:
    ctx = make_ctx(build_tokenizer())
    info, server, alias = run(ctx, ("GET", "/get_model_info", {"headers": auth()}),
                              ("GET", "/server_info", {"headers": auth()}),
                              ("GET", "/get_server_info", {"headers": auth()}))
    body: dict[str, Any] = info.json()
    assert body["model_path"] == "tiny" and body["chat_template"] == CHATML_TEMPLATE
    assert body["eos_token"] == "<|im_end|>" and body["is_generation"] is True
    assert server.status_code == alias.status_code == 200
    for secret in (TENANT, OTHER, ADMIN):
        assert secret not in server.text
    assert server.json()["internal_states"] == []
