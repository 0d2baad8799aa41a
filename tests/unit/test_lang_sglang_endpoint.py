"""RuntimeEndpoint against an SGLang-shaped server (tests/fixtures/sglang_corpus/capture.py:
SGLang's response shapes, logprob rows only from logprob_start_len on, no chat template):
the requests it sends and how it reads the answers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import radixrt.lang as sgl
from radixrt.lang import BackendError, ChatTemplate
from tests.fixtures.sglang_corpus import capture
from tests.fixtures.tiny_models import CHATML_TEMPLATE


@pytest.fixture
def url() -> Iterator[str]:
    server, url = capture.start({"model_path": "/nonexistent/model", "is_generation": True})
    del capture.RECORDED[:]
    yield url
    server.shutdown()


def generate_bodies() -> list[dict[str, Any]]:
    return [r["body"] for r in capture.RECORDED if r["path"] == "/generate"]


@sgl.function
def pick(s: Any) -> None:
    s += "The sky is"
    s += sgl.select("c", [" blue", " blue-green", " red"])


def expected_pick(stem: str, choices: list[str]) -> str:
    """The capture server's made-up logprobs (-len(piece)/4) over its 4-character pieces,
    mean over each choice's pieces after the stem's."""
    stem_p = capture._tokens(stem)
    means = []
    for c in choices:
        full = capture._tokens(stem + c)
        k = next(i for i, (a, b) in enumerate(zip(stem_p + [""], full)) if a != b)
        means.append(sum(-len(p) / 4 for p in full[k:]) / len(full[k:]))
    return choices[means.index(max(means))]


def test_select_reads_sglang_rows(url: str) -> None:
    be = sgl.RuntimeEndpoint(url)
    st = pick.run(backend=be)
    assert st["c"] == expected_pick("The sky is", [" blue", " blue-green", " red"])
    first, batch = generate_bodies()
    assert first == {"text": "The sky is", "sampling_params": {"max_new_tokens": 0}}
    assert batch["text"] == ["The sky is"] + [f"The sky is{c}" for c in
                                              (" blue", " blue-green", " red")]
    assert batch["return_logprob"] is True and batch["logprob_start_len"] == 0
    assert batch["sampling_params"] == {"max_new_tokens": 0, "temperature": 0}


def test_select_rescores_when_rows_start_inside_the_merge(url: str) -> None:
    # A long stem: rows come back from stem_tokens - 4 on. " blue" merges with the stem's
    # last piece; the choice tokens are still told apart from the stem's.
    stem = "A radix tree shares prefixes. " * 3 + "The sky is"
    choices = [" blue", " blue-green", " red"]

    @sgl.function
    def judge(s: Any) -> None:
        s += stem + sgl.select("c", choices)

    st = judge.run(backend=sgl.RuntimeEndpoint(url))
    assert st["c"] == expected_pick(stem, choices)
    starts = [b.get("logprob_start_len") for b in generate_bodies()]
    n_stem = len(capture._tokens(stem))
    assert starts[:2] == [None, n_stem - 4]


def test_unconditional_method_sends_choice_ids(url: str) -> None:
    @sgl.function
    def judge(s: Any) -> None:
        s += "Grass is" + sgl.select("c", [" green", " purple"],
                                     choices_method=sgl.unconditional_likelihood_normalized)

    st = judge.run(backend=sgl.RuntimeEndpoint(url))
    assert st["c"] in (" green", " purple")
    last = generate_bodies()[-1]
    assert isinstance(last["input_ids"], list) and len(last["input_ids"]) == 2
    assert last["logprob_start_len"] == 0
    assert "normalized_unconditional_prompt_logprobs" in st.get_meta_info("c")


def test_gen_n_stream_logprobs_flush_and_info(url: str) -> None:
    be = sgl.RuntimeEndpoint(url)

    @sgl.function
    def prog(s: Any) -> None:
        s += "Q:" + sgl.gen("a", max_tokens=4, n=2, stop="\n")
        s += sgl.gen("b", max_tokens=4, return_logprob=True, top_logprobs_num=2,
                     logprob_start_len=1, return_text_in_logprobs=True)

    st = prog.run(backend=be, temperature=0)
    assert st["a"] == [" Paris", " Paris"] and st.text().startswith("Q: Paris")
    body_a, body_b = generate_bodies()
    assert body_a["sampling_params"]["n"] == 2 and body_a["sampling_params"]["stop"] == ["\n"]
    assert body_b["return_logprob"] and body_b["top_logprobs_num"] == 2
    assert body_b["logprob_start_len"] == 1 and body_b["return_text_in_logprobs"]
    meta = st.get_meta_info("b")
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]
    assert len(meta["output_top_logprobs"]) == meta["completion_tokens"]

    @sgl.function
    def plain(s: Any) -> None:
        s += "Say:" + sgl.gen("x", max_tokens=8)

    streamed = plain.run(backend=be, temperature=0, stream=True)
    assert "".join(streamed.text_iter("x")) == plain.run(backend=be, temperature=0)["x"]
    assert sgl.flush_cache(be) is True and sgl.get_server_info(be) == {"version": "capture"}


def test_chat_template_from_model_info_or_a_clear_error(url: str, tiny_model_dir: Any) -> None:
    be = sgl.RuntimeEndpoint(url)
    with pytest.raises(BackendError, match="no chat_template: pass RuntimeEndpoint"):
        be.chat_template()
    # A local tokenizer when the server has no template (SGLang's servers).
    model = tiny_model_dir("llama")
    local = sgl.RuntimeEndpoint(url, tokenizer=str(model))
    from transformers import AutoTokenizer

    want = ChatTemplate.from_tokenizer(AutoTokenizer.from_pretrained(str(model)))
    assert local.chat_template() == want
    # The template in /get_model_info, rendered here: the same role text.
    capture.MODEL_INFO["chat_template"] = CHATML_TEMPLATE
    assert sgl.RuntimeEndpoint(url).chat_template() == want
