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
from radixrt.lang.scoring import (
    BOUNDARY_MARGIN,
    CACHE_ONLY_START,
    PromptScores,
    common_prefix_len,
    pick,
)

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
    # A choice token served from the cache (no logprob) must never be scored as if it had one.
    cached = PromptScores([5, 6, 7, 40, 41], [None, None, None, None, -4.0], 5, 0)
    with pytest.raises(AssertionError, match=r"prompt tokens \[3\] have no logprob"):
        pick(stem, ["Xy"], [cached])


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


LONG_STEM = "A radix tree shares common prefixes, so cached pages can be reused. " * 3


class RecordingBackend(EngineBackend):
    """Records prompt_logprobs calls; can blank a choice's first logprob, as if a boundary
    merge had reached into the part of the stem served from the cache."""

    def __init__(self, engine: Engine, blank_first_choice: bool = False) -> None:
        super().__init__(engine)
        self.calls: list[tuple[int, int]] = []  # (number of prompts, logprob_start_len)
        self.blank = blank_first_choice

    def prompt_logprobs(self, prompts: Any, logprob_start_len: int = 0) -> list[PromptScores]:
        self.calls.append((len(prompts), logprob_start_len))
        out = super().prompt_logprobs(prompts, logprob_start_len)
        if self.blank and len(prompts) > 1:
            self.blank = False
            x = out[0]
            lps = x.logprobs[:-1] + [None]  # the last token is inside the choice
            out[0] = PromptScores(x.token_ids, lps, x.prompt_tokens, x.cached_tokens)
        return out


@function
def long_judge(s: ProgramState) -> None:
    s += LONG_STEM + "Is that true? Answer:"
    s += select("yn", choices=[" yes", " no", " it depends"])


def test_select_scores_choices_over_the_cached_stem(engine: Engine) -> None:
    engine.flush_cache()
    rec = RecordingBackend(engine)
    state = long_judge.run(backend=rec)
    meta = state.get_meta_info("yn")
    n_stem = meta["stem_tokens"]
    assert n_stem == len(engine.encode(LONG_STEM + "Is that true? Answer:")) > 3 * PAGE
    # The stem alone (only cached), then all choices scored from a few tokens before its end.
    assert rec.calls == [(1, CACHE_ONLY_START), (3, n_stem - BOUNDARY_MARGIN)]
    # Each choice computed only its last stem tokens: the cache covers the pages before
    # logprob_start_len - 1 (row start - 1 scores token start).
    floor = (n_stem - BOUNDARY_MARGIN - 1) // PAGE * PAGE
    assert floor >= n_stem // PAGE * PAGE - PAGE
    assert all(c >= floor for c in meta["cached_tokens"]), meta["cached_tokens"]
    # Scores equal a full, uncached scoring of each stem + choice.
    stem_ids = engine.encode(LONG_STEM + "Is that true? Answer:")
    for c, got in zip([" yes", " no", " it depends"], meta["normalized_prompt_logprobs"]):
        engine.flush_cache()
        out = engine.generate(LONG_STEM + "Is that true? Answer:" + c, SamplingParams(
            max_new_tokens=1, temperature=0, prompt_logprobs=True))[0]
        assert out.cached_tokens == 0 and out.prompt_logprobs is not None
        lps = out.prompt_logprobs[common_prefix_len(stem_ids, out.prompt_token_ids):]
        assert got == pytest.approx(sum(float(x) for x in lps if x is not None) / len(lps),
                                    abs=1e-4)


def test_select_rescores_a_choice_whose_tokens_came_back_unscored(engine: Engine) -> None:
    plain = long_judge.run(backend=EngineBackend(engine))
    rec = RecordingBackend(engine, blank_first_choice=True)
    state = long_judge.run(backend=rec)
    n_stem = state.get_meta_info("yn")["stem_tokens"]
    # The blanked choice is scored again, alone, from where its tokens start.
    assert rec.calls[2:] == [(1, n_stem)]
    assert state["yn"] == plain["yn"]
    assert state.get_meta_info("yn")["normalized_prompt_logprobs"] == pytest.approx(
        plain.get_meta_info("yn")["normalized_prompt_logprobs"], abs=1e-4)


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
