"""Engine support for SGLang's native /generate: max_new_tokens 0 (prefill only, caches the
prompt), min_new_tokens (stop tokens masked until then), no_stop_trim, and top-k prompt
logprobs, with and without the overlapped scheduler."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from radixrt import Engine, SamplingParams
from tests.fixtures.tiny_models import EOS_ID

PAGE = 16
PROMPT = list(range(10, 10 + 3 * PAGE + 5))


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def engine(request, llama_dir) -> Engine:
    return Engine(str(llama_dir), page_size=PAGE, kv_cache_tokens=4096,
                  overlap_schedule=request.param)


def test_prefill_only_caches_the_prompt_and_generates_nothing(engine: Engine) -> None:
    engine.flush_cache()
    first = engine.generate(PROMPT, SamplingParams(max_new_tokens=0))[0]
    assert first.token_ids == [] and first.text == "" and first.finish_reason == "length"
    again = engine.generate(PROMPT + [7, 8], SamplingParams(max_new_tokens=2, temperature=0,
                                                            ignore_eos=True))[0]
    assert again.cached_tokens == len(PROMPT) // PAGE * PAGE, "the prefill-only pass cached it"
    assert len(again.token_ids) == 2
    engine.check_invariants()


def test_prefill_only_next_to_decoding_requests(engine: Engine) -> None:
    params = [SamplingParams(max_new_tokens=0), SamplingParams(max_new_tokens=5, temperature=0,
                                                               ignore_eos=True),
              SamplingParams(max_new_tokens=0, prompt_logprobs=True)]
    outs = engine.generate([PROMPT[:20], PROMPT[:30], PROMPT[5:40]], params)
    assert [len(o.token_ids) for o in outs] == [0, 5, 0]
    lps = outs[2].prompt_logprobs
    assert lps is not None and len(lps) == 35 and lps[0] is None
    assert all(x is not None and x <= 0 for x in lps[1:])
    engine.check_invariants()


def test_prefill_only_with_n_samples(engine: Engine) -> None:
    out = engine.generate(PROMPT[:33], SamplingParams(max_new_tokens=0, n=3))[0]
    assert [o.token_ids for o in out.outputs] == [[], [], []]
    assert all(o.finish_reason == "length" for o in out.outputs)
    engine.check_invariants()


def test_min_new_tokens_masks_eos_and_stop_tokens(engine: Engine) -> None:
    # Bias EOS and a stop token up so they win every draw, unless masked.
    stop_tok = 77
    bias = ((EOS_ID, 100.0), (stop_tok, 90.0))
    base = SamplingParams(max_new_tokens=12, temperature=0, logit_bias=bias,
                          stop_token_ids=(stop_tok,))
    early = engine.generate(PROMPT, base)[0]
    assert early.token_ids == [] and early.finish_reason == "stop"
    held = engine.generate(PROMPT, SamplingParams(
        max_new_tokens=12, temperature=0, logit_bias=bias, stop_token_ids=(stop_tok,),
        min_new_tokens=5))[0]
    assert len(held.token_ids) == 5, "exactly min_new_tokens, then the biased stop wins"
    assert EOS_ID not in held.token_ids and stop_tok not in held.token_ids
    assert held.finish_reason == "stop"


def test_min_new_tokens_validation() -> None:
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=3, min_new_tokens=4)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(min_new_tokens=2, regex="a+")
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=-1)


def test_prompt_top_logprobs_rank_the_vocabulary(engine: Engine) -> None:
    engine.flush_cache()
    out = engine.generate(PROMPT[:24], SamplingParams(
        max_new_tokens=1, temperature=0, prompt_logprobs=True, prompt_top_logprobs=3))[0]
    lps, tops = out.prompt_logprobs, out.prompt_top_logprobs
    assert lps is not None and tops is not None and len(tops) == len(lps) == 24
    assert tops[0] is None
    for k in range(1, 24):
        top = tops[k]
        assert top is not None and len(top) == 3
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        # The actual token is either among the top 3 with the same logprob, or below them.
        actual = dict(top).get(PROMPT[k])
        lp = lps[k]
        assert lp is not None
        if actual is not None:
            assert math.isclose(actual, lp, abs_tol=1e-4)
        else:
            assert lp <= values[-1] + 1e-5


def test_stop_regex_keeps_the_text_up_to_its_match(engine: Engine) -> None:
    greedy = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    text = engine.generate(PROMPT, greedy)[0].text
    if len(text) < 4:
        pytest.skip("greedy text too short")
    pattern = "".join(f"[{c}]" if c.isalnum() else f"\\{c}" if not c.isspace() else "\\s"
                      for c in text[1:3])
    out = engine.generate(PROMPT, SamplingParams(max_new_tokens=16, temperature=0,
                                                 ignore_eos=True, stop_regex=(pattern,)))[0]
    assert out.finish_reason == "stop" and out.outputs[0].matched_stop == pattern
    assert text.startswith(out.text) and len(out.text) >= 3
    assert len(out.token_ids) < 16 or out.text == text


def test_no_stop_trim_keeps_the_stop_string(engine: Engine) -> None:
    greedy = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    text = engine.generate(PROMPT, greedy)[0].text
    if len(text) < 6:
        pytest.skip("greedy text too short to cut")
    stop = text[3:5]
    cut = engine.generate(PROMPT, SamplingParams(max_new_tokens=16, temperature=0,
                                                 ignore_eos=True, stop=(stop,)))[0]
    kept = engine.generate(PROMPT, SamplingParams(max_new_tokens=16, temperature=0,
                                                  ignore_eos=True, stop=(stop,),
                                                  no_stop_trim=True))[0]
    assert cut.text == text[: text.index(stop)]
    assert kept.text == cut.text + stop and kept.finish_reason == "stop"
