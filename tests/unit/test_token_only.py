"""Serving without a tokenizer: what is refused (400 naming the problem) and how it is chosen."""

from __future__ import annotations

import json

import pytest

from radixrt.cli import add_serve_args, config_from_args
from radixrt.server import protocol as p
from radixrt.server.config import ServerConfig
from radixrt.server.tokenization import load_codec


def test_no_tokenizer_error_names_the_problem() -> None:
    e = p.no_tokenizer("prompt is text; send a list of token ids", "prompt")
    assert e.status == 400 and e.param == "prompt"
    body = e.body()["error"]
    assert body["type"] == "invalid_request_error"
    assert body["message"].startswith("this server has no tokenizer: send token ids")
    assert "prompt is text" in body["message"]


@pytest.mark.parametrize("sp", [{"stop": ["x"]}, {"stop": "x"}])
def test_stop_strings_refused_natively(sp: dict[str, object]) -> None:
    params = p.native_params(sp)
    with pytest.raises(p.APIError, match="no tokenizer.*stop_token_ids") as e:
        p.check_token_only(params)
    assert e.value.status == 400 and e.value.param == "stop"


def test_stop_strings_refused_in_openai_params() -> None:
    req = p.parse_body(json.dumps({"prompt": [1, 2], "stop": ["\n"]}).encode(),
                       p.CompletionRequest)
    with pytest.raises(p.APIError, match="no tokenizer") as e:
        p.check_token_only(p.openai_params(req))
    assert e.value.param == "stop"


def test_token_id_params_pass() -> None:
    p.check_token_only(p.native_params({"stop_token_ids": [7], "max_new_tokens": 3,
                                        "logprobs": True, "top_logprobs": 2}))
    req = p.parse_body(json.dumps({"prompt": [1, 2], "stop_token_ids": [3], "logprobs": 2})
                       .encode(), p.CompletionRequest)
    p.check_token_only(p.openai_params(req))


def test_codec_is_none_without_a_tokenizer() -> None:
    # Neither case touches the filesystem or transformers: nothing is loaded.
    assert load_codec(None, skip_tokenizer_init=False) is None
    assert load_codec("/nonexistent/model", skip_tokenizer_init=True) is None


def test_skip_tokenizer_init_flag() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    add_serve_args(ap)
    assert config_from_args(ap.parse_args([])).skip_tokenizer_init is False
    cfg = config_from_args(ap.parse_args(["--skip-tokenizer-init", "--model", "llama-tiny",
                                          "--load-format", "dummy"]))
    assert cfg.skip_tokenizer_init is True
    # It reaches the workers through the JSON config, but is not an engine knob.
    assert ServerConfig.from_json(cfg.to_json()).skip_tokenizer_init is True
    assert "skip_tokenizer_init" not in cfg.engine_kwargs()
