"""The SGLang-style frontend programs (tests/fixtures/sglang_programs.py) over HTTP: a radixrt
server on a tiny model, ``RuntimeEndpoint(url)`` with no local tokenizer (role blocks come from
the chat template in /get_model_info), and the same checks as in process."""

from __future__ import annotations

from typing import Any

import pytest

import radixrt.lang as sgl
from tests.e2e.conftest import API_KEY, Server
from tests.fixtures import sglang_programs as programs

ADMIN_KEY = "sk-admin-key"  # /flush_cache acts on every tenant's cache: admin only


@pytest.fixture(scope="module")
def server(server_factory: Any, tiny_model_dir: Any) -> Server:
    return server_factory(tiny_model_dir("llama"), "--page-size", "16", "--admin-api-key",
                          ADMIN_KEY, api_key=API_KEY)


@pytest.fixture(scope="module")
def http(server: Server) -> sgl.RuntimeEndpoint:
    return sgl.RuntimeEndpoint(server.url, api_key=API_KEY)


@pytest.mark.parametrize("check", programs.CHECKS, ids=lambda c: c.__name__)
def test_sglang_program_over_http(http: sgl.RuntimeEndpoint, check: Any) -> None:
    check(http)


def test_default_backend_flush_and_server_info_over_http(server: Server) -> None:
    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url, api_key=ADMIN_KEY))
    try:
        q = "What is the capital of Peru?"
        programs.few_shot_qa.run(question=q, temperature=0)
        again = programs.few_shot_qa.run(question=q, temperature=0)
        assert again.get_meta_info("answer")["cached_tokens"] > 0
        assert sgl.flush_cache() is True
        after = programs.few_shot_qa.run(question=q, temperature=0)
        assert after.get_meta_info("answer")["cached_tokens"] == 0
        assert isinstance(sgl.get_server_info(), dict)
    finally:
        sgl.set_default_backend(None)  # type: ignore[arg-type]
