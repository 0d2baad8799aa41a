"""Hypothesis over the request schemas, in process: every body becomes a Job or a 400 naming a
field, never another exception; and every Job the router accepts is one the IPC can carry and
the engine can seed (so nothing can fail after the request was counted as queued)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixrt.sampling_params import MAX_SEED
from radixrt.server import messages as m
from radixrt.server.config import ServerConfig
from radixrt.server.metrics import ServerMetrics
from radixrt.server.protocol import APIError, ModelLimits
from radixrt.server.router import chat_job, completion_job, generate_job
from radixrt.server.serving import Job, ServingContext
from radixrt.server.tokenization import TextCodec
from tests.fixtures.hostile_requests import CHAT, COMPLETIONS, requests
from tests.fixtures.tiny_models import build_tokenizer

VOCAB = 512
_BUILDERS = {CHAT: chat_job, COMPLETIONS: completion_job}


@pytest.fixture(scope="module")
def ctx() -> ServingContext:
    cfg = ServerConfig(api_keys=("sk-a", "sk-b"))
    return ServingContext(cfg, None, TextCodec(build_tokenizer()),  # type: ignore[arg-type]
                          ServerMetrics(), ModelLimits(VOCAB, 256), ("tiny",))


def build(ctx: ServingContext, path: str, raw: bytes) -> Job | APIError:
    request = SimpleNamespace(state=SimpleNamespace(api_key="sk-a"))
    try:
        return _BUILDERS.get(path, generate_job)(ctx, request, raw)  # type: ignore[arg-type]
    except APIError as e:
        return e


def check_job(job: Job) -> None:
    p = job.params
    assert 1 <= len(job.prompts) * p.n <= 256
    for ids in job.prompts:
        assert ids and all(0 <= t < VOCAB for t in ids)
        assert len(ids) + p.max_new_tokens <= 256
    if p.seed is not None:
        assert p.seed >= 0 and p.seed + p.n - 1 <= MAX_SEED
    for i in range(p.n):  # what the worker will see for each sample: must encode and decode
        child = p.with_seed_offset(i)
        wire = m.encode(m.GenerateReq("r", job.prompts[0], child, job.namespace))
        assert m.decode_to_worker(wire) == m.GenerateReq("r", job.prompts[0], child,
                                                         job.namespace)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(req=requests)
def test_every_body_is_a_job_or_a_400(ctx: ServingContext, req: tuple[str, Any]) -> None:
    path, body = req
    out = build(ctx, path, json.dumps(body, allow_nan=True).encode())
    if isinstance(out, APIError):
        assert out.status == 400, out.message
        assert out.body()["error"]["type"] == "invalid_request_error"
    else:
        check_job(out)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(path=st.sampled_from([CHAT, COMPLETIONS, "/generate"]), raw=st.binary(max_size=64))
def test_arbitrary_bytes_are_a_400(ctx: ServingContext, path: str, raw: bytes) -> None:
    out = build(ctx, path, raw)
    assert isinstance(out, APIError) and out.status == 400, out


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(depth=st.integers(1, 300), closed=st.booleans(), kind=st.sampled_from([b"[]", b"{}"]))
def test_nesting_is_bounded_without_recursion(ctx: ServingContext, depth: int, closed: bool,
                                              kind: bytes) -> None:
    # Brackets only ever as structure: deep ones get a 400 from the depth scan, never a
    # RecursionError; shallow ones get as far as the schema (a 400 for the wrong shape).
    body = kind[:1] * depth + (kind[1:] * depth if closed else b"")
    out = build(ctx, CHAT, body)
    assert isinstance(out, APIError) and out.status == 400
    if depth > 64:
        assert "deeper" in out.message
