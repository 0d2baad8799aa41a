"""The real server on the default model (SmolLM2-135M-Instruct), driven by the openai client."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.e2e.conftest import Server


@pytest.mark.slow
def test_default_model_answers_and_caches(server_factory: Any, default_model_dir: Any) -> None:
    s: Server = server_factory(None)  # no --model: the default model
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
    (model,) = [m.id for m in client.models.list().data]
    assert model == "SmolLM2-135M-Instruct"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=24,  # type: ignore[arg-type]
                                       temperature=0)
    assert "Paris" in (r.choices[0].message.content or "")
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=24,  # type: ignore[arg-type]
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == r.choices[0].message.content
    assert usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens_details.cached_tokens or 0) >= 16  # the repeated prompt hits
