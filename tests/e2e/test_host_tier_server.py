"""The server with a host KV tier (--host-kv-cache-tokens): a prompt pushed off the small GPU
pool by other traffic is answered from the host tier, and usage.cached_tokens says so; /metrics
shows the tier's pages, hits and bytes."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server

PAGE = 16
GPU_TOKENS = 256


@pytest.fixture(scope="module")
def server(server_factory: Any) -> Server:
    return server_factory(None, "--model", "llama-tiny", "--load-format", "dummy",
                          "--page-size", str(PAGE), "--kv-cache-tokens", str(GPU_TOKENS),
                          "--host-kv-cache-tokens", "4096")


def complete(server: Server, prompt: list[int]) -> dict[str, Any]:
    r = httpx.post(server.url + "/v1/completions", timeout=60, headers=server.headers,
                   json={"prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_cached_tokens_include_host_hits(server: Server) -> None:
    rng = random.Random(5)
    doc = [rng.randrange(3, 500) for _ in range(160)]
    first = complete(server, doc + [1, 2])
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    for _ in range(3):  # 600 other tokens through a 256-token GPU pool: doc leaves the GPU
        complete(server, [rng.randrange(3, 500) for _ in range(200)])
    again = complete(server, doc + [3, 4])
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 160, again["usage"]
    m = server.metrics()
    assert m['radixrt_host_kv_hit_tokens{worker="0"}'] >= 144, "served by a host-tier load"
    assert m['radixrt_host_kv_bytes{worker="0",direction="loaded"}'] > 0
    assert m['radixrt_host_kv_bytes{worker="0",direction="written"}'] > 0
    assert m['radixrt_host_kv_pages{worker="0",state="total"}'] == 4096 // PAGE
