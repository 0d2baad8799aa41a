"""DSL programs against a live CPU server (RuntimeEndpoint) give the in-process engine's greedy
results; forks hit the stem's cached pages on the server; server errors surface by name."""

from __future__ import annotations

from typing import Any

import pytest

from radixrt import Engine
from radixrt.lang import (
    EngineBackend,
    ProgramError,
    ProgramState,
    RuntimeEndpoint,
    assistant,
    function,
    gen,
    select,
    system,
    user,
)
from radixrt.lang.scoring import BOUNDARY_MARGIN
from tests.e2e.conftest import API_KEY, Server

PAGE = 16
STEM = "A radix tree shares common prefixes, so cached pages can be reused. " * 3


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Any) -> Any:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def server(server_factory: Any, model_dir: Any) -> Server:
    return server_factory(model_dir, "--page-size", str(PAGE), api_key=API_KEY)


@pytest.fixture(scope="module")
def http(server: Server) -> RuntimeEndpoint:
    # No tokenizer: role blocks use the chat template the server reports.
    return RuntimeEndpoint(server.url, api_key=API_KEY)


@pytest.fixture(scope="module")
def local(model_dir: Any) -> EngineBackend:
    return EngineBackend(Engine(str(model_dir), page_size=PAGE))


@function
def multi_turn(s: ProgramState, questions: list[str]) -> None:
    s += system("You are terse.")
    for i, q in enumerate(questions):
        s += user(q)
        s += assistant(gen(f"a{i}", max_tokens=5))


@function
def tree(s: ProgramState) -> None:
    s += STEM
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Branch {i}:"
    forks += gen("b", max_tokens=4)
    s.set_var("branches", forks.join("b"))
    s.set_var("cached", [f.get_meta_info("b")["cached_tokens"] for f in forks])


def test_same_greedy_results_over_http_and_in_process(http: RuntimeEndpoint,
                                                      local: EngineBackend) -> None:
    qs = ["Hello, how are you?", "What is a radix tree?"]
    remote = multi_turn.run(questions=qs, backend=http, temperature=0)
    here = multi_turn.run(questions=qs, backend=local, temperature=0)
    assert remote.text() == here.text() and remote.messages() == here.messages()
    # Turn 2's prompt extends turn 1's: the server serves turn 1's full pages from the cache.
    first = remote.get_meta_info("a0")["prompt_tokens"]
    assert remote.get_meta_info("a1")["cached_tokens"] >= first // PAGE * PAGE

    r_tree, l_tree = tree.run(backend=http, temperature=0), tree.run(backend=local, temperature=0)
    assert r_tree["branches"] == l_tree["branches"]


def test_forked_branches_hit_the_stem_on_the_server(http: RuntimeEndpoint,
                                                    local: EngineBackend) -> None:
    state = tree.run(backend=http, temperature=0)
    stem_len = len(local.engine.encode(STEM))
    assert all(c >= stem_len // PAGE * PAGE for c in state["cached"]), state["cached"]


def test_streaming_over_http(http: RuntimeEndpoint) -> None:
    full = multi_turn.run(questions=["Hi"], backend=http, temperature=0)
    streamed = multi_turn.run(questions=["Hi"], backend=http, temperature=0, stream=True)
    pieces = list(streamed.text_iter())
    assert "".join(pieces) == full.text() and streamed["a0"] == full["a0"]


def test_select_over_http_matches_in_process(http: RuntimeEndpoint, local: EngineBackend) -> None:
    @function
    def judge(s: ProgramState) -> None:
        s += "Is the sky blue? Answer:"
        s += select("yn", choices=[" yes", " no", " it depends"])

    remote, here = judge.run(backend=http), judge.run(backend=local)
    assert remote["yn"] == here["yn"]
    assert remote.get_meta_info("yn")["normalized_prompt_logprobs"] == pytest.approx(
        here.get_meta_info("yn")["normalized_prompt_logprobs"], abs=1e-3)


def test_select_over_http_serves_the_stem_from_cache(http: RuntimeEndpoint,
                                                     local: EngineBackend) -> None:
    question = STEM + "Does a radix tree share prefixes? Answer:"

    @function
    def judge(s: ProgramState) -> None:
        s += question
        s += select("yn", choices=[" yes", " no", " it depends"])

    remote, here = judge.run(backend=http), judge.run(backend=local)
    assert remote["yn"] == here["yn"]
    assert remote.get_meta_info("yn")["normalized_prompt_logprobs"] == pytest.approx(
        here.get_meta_info("yn")["normalized_prompt_logprobs"], abs=1e-3)
    meta = remote.get_meta_info("yn")
    n_stem = meta["stem_tokens"]
    assert n_stem == len(local.engine.encode(question)) > 3 * PAGE
    # Every choice request computed only the stem's tail: the server served the pages before
    # logprob_start_len - 1 = n_stem - BOUNDARY_MARGIN - 1 from its cache.
    floor = (n_stem - BOUNDARY_MARGIN - 1) // PAGE * PAGE
    assert floor >= n_stem // PAGE * PAGE - PAGE
    assert all(c >= floor for c in meta["cached_tokens"]), (meta["cached_tokens"], n_stem)


def test_server_errors_are_raised_naming_the_call(http: RuntimeEndpoint) -> None:
    @function
    def too_long(s: ProgramState) -> None:
        s += "hello world " * 1500  # past the tiny model's 2048-token context
        s += gen("x", max_tokens=2)

    with pytest.raises(ProgramError, match=r"gen\('x'\) failed: server error 400: .*context"):
        too_long.run(backend=http)
