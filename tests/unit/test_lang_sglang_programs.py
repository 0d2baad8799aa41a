"""SGLang-style frontend programs (tests/fixtures/sglang_programs.py) on radixrt.lang in
process (tiny random model), plus what radixrt rejects by name and the default backend."""

from __future__ import annotations

from typing import Any

import pytest

import radixrt.lang as sgl
from radixrt import Engine
from radixrt.lang.extras import split_reasoning
from tests.fixtures import sglang_programs as programs


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Any) -> sgl.EngineBackend:
    return sgl.EngineBackend(Engine(str(tiny_model_dir("llama")), page_size=16,
                                    kv_cache_tokens=8192))


@pytest.mark.parametrize("check", programs.CHECKS, ids=lambda c: c.__name__)
def test_sglang_program(backend: sgl.EngineBackend, check: Any) -> None:
    check(backend)


def test_default_backend_flush_and_server_info(backend: sgl.EngineBackend) -> None:
    sgl.set_default_backend(backend)
    try:
        assert sgl.global_config.default_backend is backend
        st = programs.few_shot_qa.run(question="What is the capital of Peru?", temperature=0)
        again = programs.few_shot_qa.run(question="What is the capital of Peru?",
                                         temperature=0)
        assert again.get_meta_info("answer")["cached_tokens"] > 0
        assert sgl.flush_cache() is True
        after = programs.few_shot_qa.run(question="What is the capital of Peru?",
                                         temperature=0)
        assert after.get_meta_info("answer")["cached_tokens"] == 0
        assert after["answer"] == st["answer"]
        info = sgl.get_server_info()
        assert info["page_size"] == 16
    finally:
        sgl.set_default_backend(None)  # type: ignore[arg-type]
    with pytest.raises(sgl.ProgramError, match="no backend"):
        programs.few_shot_qa.run(question="x")


def test_str_plus_gen_builds_one_expression() -> None:
    e = "Color: " + sgl.gen("c", max_tokens=2) + "\n" + sgl.gen("d")
    assert e.describe() == "'Color: ' + gen('c') + '\\n' + gen('d')"
    with pytest.raises(TypeError, match="cannot join int"):
        sgl.gen("x") + 3  # type: ignore[operator]


def test_unsupported_calls_fail_by_name() -> None:
    with pytest.raises(NotImplementedError, match="image.*text-only"):
        sgl.image("cat.png")
    with pytest.raises(NotImplementedError, match="video"):
        sgl.video("cat.mp4", 4)
    with pytest.raises(NotImplementedError, match="RuntimeEndpoint"):
        sgl.Runtime(model_path="x")
    with pytest.raises(NotImplementedError, match="EngineBackend"):
        sgl.Engine(model_path="x")
    with pytest.raises(ValueError, match="min_tokens must be in"):
        programs.qa.run(question="x", backend=_NoCalls(), max_new_tokens=4, min_new_tokens=8)
    with pytest.raises(ValueError, match="temperature"):
        sgl.select("x", ["a", "b"], temperature=0.5)
    with pytest.raises(ValueError, match="num_api_spec_tokens"):
        sgl.function(num_api_spec_tokens=64)
    with pytest.raises(ValueError, match="dtype"):
        sgl.gen("x", dtype=list)
    with pytest.raises(ValueError, match="one of regex"):
        sgl.gen("x", dtype=int, regex="[0-9]+")
    with pytest.raises(ValueError, match="custom"):
        sgl.select("x", ["a"], choices_method=lambda **kw: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_type 'nope'"):
        @sgl.function
        def p(s):  # type: ignore[no-untyped-def]
            s += "hi" + sgl.separate_reasoning(sgl.gen("a", max_tokens=1), model_type="nope")

        p.run(backend=_NoCalls())
    with pytest.raises(ValueError, match="stop_regex"):
        programs.qa.run(question="x", backend=_NoCalls(), stop_regex="(")


def test_gen_choices_is_a_select() -> None:
    e = sgl.gen("c", choices=["a", "b"])
    assert e.describe() == "select('c')"


def test_split_reasoning() -> None:
    assert split_reasoning("<think>hmm</think> Paris", "qwen3") == ("hmm", "Paris")
    assert split_reasoning("Paris", "qwen3") == ("", "Paris")
    # Templates that open the block in the prompt: output before </think> is reasoning.
    assert split_reasoning("hmm</think>Paris", "deepseek-r1") == ("hmm", "Paris")
    assert split_reasoning("still thinking", "deepseek-r1") == ("still thinking", "")


class _NoCalls:
    """A backend for programs that must fail before calling the model."""

    def __getattr__(self, name: str) -> Any:
        if name == "reasoning_parser":
            return lambda: None
        raise AssertionError(f"backend.{name} called")
