"""The DSL on the in-process engine (tiny random model): results equal direct Engine calls,
select picks the best normalized logprob, forks and batches reuse cached prefixes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from radixrt import Engine, SamplingParams
from radixrt.lang import (
    ChatTemplate,
    EngineBackend,
    ProgramError,
    ProgramState,
    assistant,
    function,
    gen,
    select,
    system,
    user,
    user_end,
)
from radixrt.lang.scoring import PromptScores, common_prefix_len, pick

PAGE = 16
GREEDY = SamplingParams(max_new_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Any) -> Engine:
    return Engine(str(tiny_model_dir("llama")), page_size=PAGE, kv_cache_tokens=8192)


@pytest.fixture(scope="module")
def backend(engine: Engine) -> EngineBackend:
    return EngineBackend(engine)


def test_pick_scores_only_the_choice_tokens_after_a_boundary_merge() -> None:
    stem = [5, 6, 7, 8]  # the last stem token (say " ") merges into the choice's first token
    a = PromptScores([5, 6, 7, 40, 41], [None, -1.0, -1.0, -2.0, -4.0], 5, 0)
    b = PromptScores([5, 6, 7, 8, 50], [None, -1.0, -1.0, -0.5, -2.5], 5, 0)
    res = pick(stem, ["Xy", "z"], [a, b])
    assert res.num_tokens == [2, 1]
    assert res.normalized == [-3.0, -2.5] and res.sums == [-6.0, -2.5] and res.best == 1
    assert pick(stem, ["Xy", "z"], [a, b], "sum").best == 1
    tie = pick(stem, ["p", "q"], [b, b])
    assert tie.best == 0, "ties go to the first choice"
    with pytest.raises(ValueError, match="adds no tokens"):
        pick(stem, ["?"], [PromptScores(stem, [None, -1.0, -1.0, -1.0], 4, 0)])


def test_chat_template_roles_match_apply_chat_template(engine: Engine) -> None:
    tok = engine.tokenizer
    t = ChatTemplate.from_tokenizer(tok)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    got = "".join(t.prefix[m["role"]] + m["content"] + t.suffix[m["role"]] for m in msgs)
    assert got + t.prefix["assistant"] == want
    # A template that injects a default system prompt (as SmolLM2's does) is detected.
    default = "<|im_start|>system\nBe nice.<|im_end|>\n"
    tok2 = type(tok).from_pretrained(Path(tok.name_or_path)) if tok.name_or_path else tok
    tok2.chat_template = ("{% if messages[0]['role'] != 'system' %}" + default.replace(
        "\n", "\\n").join(["{{ '", "' }}"]) + "{% endif %}" + tok.chat_template)
    t2 = ChatTemplate.from_tokenizer(tok2)
    assert t2.default_system == default and t2.prefix == t.prefix


@function
def chat_qa(s: ProgramState, question: str) -> None:
    s += system("You are terse.")
    s += user(question)
    s += assistant(gen("answer", max_tokens=6))


def test_roles_and_gen_equal_engine_chat(engine: Engine, backend: EngineBackend) -> None:
    q = "What is a radix tree?"
    state = chat_qa.run(question=q, backend=backend, temperature=0)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": q}]
    ref = engine.chat(msgs, GREEDY)[0]
    assert state["answer"] == ref.text
    assert state.messages() == [*msgs, {"role": "assistant", "content": ref.text}]
    meta = state.get_meta_info("answer")
    assert meta["prompt_tokens"] == ref.prompt_tokens and meta["completion_tokens"] == 6
    assert state.text().endswith(ref.text + "<|im_end|>\n")


def test_plain_text_gen_equals_engine_generate(engine: Engine, backend: EngineBackend) -> None:
    @function
    def cont(s: ProgramState, prefix: str) -> None:
        s += prefix
        s += gen("x", max_tokens=6, stop=None)
        s += " then "
        s += gen("y", max_tokens=4)

    state = cont.run(prefix="The quick brown fox", backend=backend, temperature=0)
    x = engine.generate("The quick brown fox", GREEDY)[0].text
    y = engine.generate("The quick brown fox" + x + " then ",
                        SamplingParams(max_new_tokens=4, temperature=0))[0].text
    assert (state["x"], state["y"]) == (x, y)
    assert state.text() == "The quick brown fox" + x + " then " + y


def test_select_picks_highest_normalized_logprob(engine: Engine, backend: EngineBackend) -> None:
    stem = "Question: what is the capital of France? Answer:"
    choices = [" Paris", " the city of Lyon", " Berlin", "Paris, France"]

    @function
    def pick_one(s: ProgramState) -> None:
        s += stem
        s += select("city", choices=choices)

    state = pick_one.run(backend=backend)
    # Reference: prompt logprobs straight from the engine, choice tokens after the common
    # prefix of the stem's ids and the stem+choice ids.
    stem_ids = engine.encode(stem)
    means = []
    for c in choices:
        out = engine.generate(stem + c, SamplingParams(max_new_tokens=1, temperature=0,
                                                       prompt_logprobs=True))[0]
        assert out.prompt_logprobs is not None
        k = common_prefix_len(stem_ids, out.prompt_token_ids)
        lps = [float(x) for x in out.prompt_logprobs[k:] if x is not None]
        means.append(sum(lps) / len(lps))
    best = max(range(len(choices)), key=lambda i: means[i])
    assert state["city"] == choices[best]
    assert state.text() == stem + choices[best]
    got = state.get_meta_info("city")["normalized_prompt_logprobs"]
    assert got == pytest.approx(means, abs=1e-4)


def test_fork_branches_hit_the_cached_stem(engine: Engine, backend: EngineBackend) -> None:
    stem = "A radix tree shares common prefixes, so cached pages can be reused. " * 3

    @function
    def branches(s: ProgramState) -> None:
        s += stem
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f"Idea {i}:"
        forks += gen("idea", max_tokens=4)
        s.set_var("ideas", forks.join("idea"))
        s.set_var("cached", [f.get_meta_info("idea")["cached_tokens"] for f in forks])

    state = branches.run(backend=backend, temperature=0)
    stem_len = len(engine.encode(stem))
    assert stem_len > 3 * PAGE
    for c in state["cached"]:
        assert c >= stem_len // PAGE * PAGE, "every branch reuses the stem's full pages"
    for i, idea in enumerate(state["ideas"]):
        ref = engine.generate(stem + f"Idea {i}:", SamplingParams(max_new_tokens=4,
                                                                  temperature=0))[0].text
        assert idea == ref


def test_run_batch_shared_header_hit_rate_near_optimal(engine: Engine,
                                                       backend: EngineBackend) -> None:
    header = "".join(f"Q: What is {a} plus {a}? A: {2 * a}.\n" for a in range(1, 9))
    questions = [f"Q: What is {a} plus {a}? A:" for a in range(10, 18)]

    @function
    def fewshot(s: ProgramState, q: str) -> None:
        s += header + q
        s += gen("a", max_tokens=3)

    engine.flush_cache()
    states = fewshot.run_batch([{"q": q} for q in questions], backend=backend, temperature=0,
                               num_threads=8)
    prompts = [engine.encode(header + q) for q in questions]
    # Optimal: each request after the first reuses the full pages it shares with an earlier one.
    optimal = sum(max(common_prefix_len(p, prompts[j]) for j in range(i)) // PAGE * PAGE
                  for i, p in enumerate(prompts) if i > 0)
    cached = sum(s.get_meta_info("a")["cached_tokens"] for s in states)
    assert optimal > 0 and cached >= 0.9 * optimal, (cached, optimal)
    for s, q in zip(states, questions):
        ref = engine.generate(header + q, SamplingParams(max_new_tokens=3, temperature=0))[0]
        assert s["a"] == ref.text


def test_streaming_yields_the_same_text(backend: EngineBackend) -> None:
    full = chat_qa.run(question="Hello there", backend=backend, temperature=0)
    streamed = chat_qa.run(question="Hello there", backend=backend, temperature=0, stream=True)
    pieces = list(streamed.text_iter())
    assert len(pieces) > 3 and "".join(pieces) == full.text() == streamed.text()
    assert streamed["answer"] == full["answer"]


def test_errors_name_the_failing_call(backend: EngineBackend) -> None:
    @function
    def too_long(s: ProgramState) -> None:
        s += "hello world " * 1500  # past the tiny model's 2048-token context
        s += gen("x", max_tokens=2)

    with pytest.raises(ProgramError, match=r"gen\('x'\) failed: .*context"):
        too_long.run(backend=backend)

    @function
    def bad_roles(s: ProgramState) -> None:
        s += user_end()

    with pytest.raises(ProgramError, match="user_end"):
        bad_roles.run(backend=backend)

    @function
    def maybe_long(s: ProgramState, n: int) -> None:
        s += "hi " * n
        s += gen("x", max_tokens=2)

    with pytest.raises(ProgramError, match=r"program 1 of 2 failed: gen\('x'\)"):
        maybe_long.run_batch([{"n": 3}, {"n": 3000}], backend=backend)
