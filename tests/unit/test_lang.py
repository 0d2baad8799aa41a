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
from radixrt.lang.choices import (
    greedy_token_selection,
    sum_logprobs,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from radixrt.lang.scoring import (
    BOUNDARY_MARGIN,
    PromptScores,
    choice_tokens,
    common_prefix_len,
    rescore_from,
)

PAGE = 16
GREEDY = SamplingParams(max_new_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Any) -> Engine:
    return Engine(str(tiny_model_dir("llama")), page_size=PAGE, kv_cache_tokens=8192)


@pytest.fixture(scope="module")
def backend(engine: Engine) -> EngineBackend:
    return EngineBackend(engine)


def test_choice_tokens_are_those_after_a_boundary_merge() -> None:
    # The last stem token (say " ") merges into the choice's first token.
    stem = PromptScores([5, 6, 7, 8], [None, -1.0, -1.0, -1.0], 4, 0)
    a = PromptScores([5, 6, 7, 40, 41], [None, -1.0, -1.0, -2.0, -4.0], 5, 0)
    b = PromptScores([5, 6, 7, 8, 50], [None, -1.0, -1.0, -0.5, -2.5], 5, 0)
    ta, tb = choice_tokens(stem, a, "Xy"), choice_tokens(stem, b, "z")
    assert (ta.token_ids, ta.logprobs) == ([40, 41], [-2.0, -4.0])
    assert (tb.token_ids, tb.logprobs) == ([50], [-2.5])
    assert token_length_normalized.decide([ta, tb]).best == 1  # -3.0 vs -2.5
    assert sum_logprobs.decide([ta, tb]).best == 1
    assert token_length_normalized.decide([tb, tb]).best == 0, "ties go to the first choice"
    with pytest.raises(ValueError, match="adds no tokens"):
        choice_tokens(stem, PromptScores([5, 6, 7, 8], [None, -1.0, -1.0, -1.0], 4, 0), "?")
    # A choice token served from the cache (no logprob) is rescored from where it starts,
    # and never scored as if it had one.
    cached = PromptScores([5, 6, 7, 40, 41], [None, None, None, None, -4.0], 5, 0)
    assert rescore_from(stem, cached, "Xy") == 3 and rescore_from(stem, a, "Xy") is None
    with pytest.raises(AssertionError, match=r"prompt tokens \[3\] have no logprob"):
        choice_tokens(stem, cached, "Xy")


def test_sglang_row_layout_and_uncertain_starts() -> None:
    # SGLang returns rows only from logprob_start_len on: ids before it are unknown.
    rows = [[-1.0, 7, "a"], [-2.0, 8, "b"]]
    s = PromptScores.from_rows(rows, 2, 4, 0)
    assert s.token_ids == [-1, -1, 7, 8] and s.logprobs == [None, None, -1.0, -2.0]
    assert s.token_texts == [None, None, "a", "b"] and s.known_from == 2
    full_rows = [[None, 5, None], [-0.5, 6, None], *rows]  # one row per prompt token
    assert PromptScores.from_rows(full_rows, 2, 4, 0).token_ids == s.token_ids
    with pytest.raises(ValueError, match="3 logprob rows"):
        PromptScores.from_rows(rows + rows[:1], 2, 4, 0)
    # The choice differs from the stem at the first returned row: it may differ earlier
    # too, so it is scored again from further back.
    stem = PromptScores.from_rows([[-1.0, 7], [-1.0, 8]], 20, 22, 0)
    full = PromptScores.from_rows([[-1.0, 9], [-1.0, 10], [-1.0, 11]], 20, 23, 0)
    assert rescore_from(stem, full, "x") == 20 - 4 * BOUNDARY_MARGIN
    ok = PromptScores.from_rows([[-1.0, 7], [-1.0, 12]], 20, 22, 0)
    assert rescore_from(stem, ok, "x") is None


def test_greedy_and_unconditional_methods() -> None:
    stem = PromptScores([1, 2], [None, -1.0], 2, 0)
    long_ = choice_tokens(stem, PromptScores([1, 2, 3, 4], [None, -1.0, -0.5, -3.0], 4, 0), "ab")
    short = choice_tokens(stem, PromptScores([1, 2, 5], [None, -1.0, -0.7], 3, 0), "c")
    # Greedy: position 0 decides (-0.5 beats -0.7) although the mean prefers the short one.
    d = greedy_token_selection.decide([long_, short])
    assert d.best == 0 and d.meta["greedy_logprob_matrix"] == [[-0.5, -3.0], [-0.7, -0.7]]
    assert token_length_normalized.decide([long_, short]).best == 1
    # Unconditional: subtract each token's no-context logprob (the first counts as 0).
    u = unconditional_likelihood_normalized.decide([long_, short], [[None, -0.5], [None]])
    assert u.meta["normalized_unconditional_prompt_logprobs"] == [(-0.5 - 2.5) / 2, -0.7]
    assert u.best == 1
    with pytest.raises(ValueError, match="unconditional"):
        unconditional_likelihood_normalized.decide([long_])


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
        self.cached = 0
        self.blank = blank_first_choice

    def cache_prefix(self, prompt: str) -> Any:
        self.cached += 1
        return super().cache_prefix(prompt)

    def prompt_logprobs(self, prompts: Any, logprob_start_len: int = 0) -> list[PromptScores]:
        self.calls.append((len(prompts), logprob_start_len))
        out = super().prompt_logprobs(prompts, logprob_start_len)
        if self.blank and len(prompts) > 1:
            self.blank = False
            x = out[1]  # out[0] is the stem
            lps = x.logprobs[:-1] + [None]  # the last token is inside the choice
            out[1] = PromptScores(x.token_ids, lps, x.prompt_tokens, x.cached_tokens)
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
    # The stem alone (only cached), then stem + all choices scored from a few tokens before
    # its end.
    assert rec.calls == [(4, n_stem - BOUNDARY_MARGIN)] and rec.cached == 1
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
    assert rec.calls[1:] == [(2, n_stem)]
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
