"""Concurrency (200 streaming requests) and data-parallel prefix routing (--dp 2), on CPU."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Server

PAGE = 16
MAX_TOKENS = 6


@pytest.mark.slow
def test_200_concurrent_streams_then_no_pages_held(server_factory: Any,
                                                   tiny_model_dir: Any) -> None:
    s: Server = server_factory(tiny_model_dir("llama"), "--page-size", str(PAGE))
    client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0,
                                timeout=180, http_client=None)

    async def one(i: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=str(tiny_model_dir("llama")),
            messages=[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
            max_tokens=MAX_TOKENS, temperature=0.7, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, finish, completion = "", None, -1
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                completion = chunk.usage.completion_tokens
        return text, finish, completion

    async def run_all() -> list[tuple[str, str | None, int]]:
        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    assert len(results) == 200
    assert all(finish == "length" and n == MAX_TOKENS for _, finish, n in results)
    # Afterwards: no pages are held by finished requests (only the cache's evictable ones).
    deadline = time.monotonic() + 10
    while True:
        m = s.metrics()
        if m['radixrt_running_requests{worker="0"}'] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert m['radixrt_running_requests{worker="0"}'] == 0
    assert m['radixrt_queued_requests{worker="0"}'] == 0
    assert m['radixrt_kv_pages{worker="0",state="private"}'] == 0
    assert m['radixrt_kv_pages{worker="0",state="locked"}'] == 0
    assert (m['radixrt_kv_pages{worker="0",state="free"}']
            + m['radixrt_kv_pages{worker="0",state="evictable"}']
            == m['radixrt_kv_pages{worker="0",state="total"}'])
    assert m['radixrt_requests_total{endpoint="chat",status="ok"}'] == 200
    assert m["radixrt_generation_tokens_total"] == 200 * MAX_TOKENS
    assert m["radixrt_time_to_first_token_seconds_count"] == 200


def test_dp2_routes_shared_prefixes_to_the_same_worker(server_factory: Any,
                                                       tiny_model_dir: Any) -> None:
    s: Server = server_factory(tiny_model_dir("llama"), "--dp", "2", "--page-size", str(PAGE))
    prefix_a = list(range(20, 20 + 4 * PAGE))
    prefix_b = list(range(200, 200 + 4 * PAGE))

    def complete(prompt: list[int], max_tokens: int = 2) -> dict[str, Any]:
        r = httpx.post(s.url + "/v1/completions", timeout=60,
                       json={"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def first_two() -> None:
        # A is still running when B arrives, so B goes to the other (idle) worker.
        async with httpx.AsyncClient(timeout=60) as c:
            ta = asyncio.create_task(c.post(s.url + "/v1/completions", json={
                "prompt": prefix_a + [1], "max_tokens": 400, "ignore_eos": True}))
            await asyncio.sleep(0.2)
            rb = await c.post(s.url + "/v1/completions", json={
                "prompt": prefix_b + [1], "max_tokens": 2, "ignore_eos": True})
            assert rb.status_code == 200 and (await ta).status_code == 200

    asyncio.run(first_two())
    for k in range(3):  # each family keeps hitting its own worker's cache
        for prefix in (prefix_a, prefix_b):
            out = complete(prefix + [3 + k])
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= 4 * PAGE
    m = s.metrics()
    assert m['radixrt_cache_hit_rate{worker="0"}'] > 0
    assert m['radixrt_cache_hit_rate{worker="1"}'] > 0
