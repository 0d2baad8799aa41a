"""IncrementalDetokenizer against real (locally trained) Hugging Face tokenizers."""

from __future__ import annotations

import random

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from radixrt.text import IncrementalDetokenizer, StopMatcher  # noqa: E402

SPECIALS = ["<|im_start|>", "<|im_end|>"]
CORPUS = [
    "héllo wörld 你好 🙂 hello world",
    "the quick brown fox jumps over the lazy dog",
    "naïve café über straße",
] * 10 + ["Stop here. END of text ### done"]
# 中, 文, 😀, 🎉 never occur in CORPUS, so they can only be spelled with single-byte tokens.
TEXTS = [
    "héllo wörld 你好 🙂 hello world",
    "中文 and 😀🎉 mixed with the quick fox",
    "  leading spaces, tabs\tand\nnewlines  ",
    "naïve café ### END über 🙂🙂",
]


def _train(pre_tokenizer, decoder) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", additional_special_tokens=SPECIALS
    )


@pytest.fixture(scope="module")
def tok() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import decoders, pre_tokenizers

    return _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


def _decode(tok, ids, skip=True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def _stream(tok, ids, chunk_sizes=None, **kw) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, **kw)
    pieces, i = [], 0
    sizes = iter(chunk_sizes or [])
    while i < len(ids):
        n = next(sizes, 1)
        pieces.append(d.add(ids[i : i + n]).text)
        i += n
    pieces.append(d.flush())
    return pieces, d


def test_multibyte_chars_really_span_tokens(tok) -> None:
    # Guards the other tests: they are only meaningful if characters get split.
    ids = tok.encode("中😀", add_special_tokens=False)
    assert len(ids) == 7  # 3 bytes + 4 bytes, one token each
    assert all("\ufffd" in _decode(tok, [i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(tok, text) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    pieces, d = _stream(tok, ids)
    assert "".join(pieces) == _decode(tok, ids) == text
    assert d.full_text == text
    # No piece ever carries a replacement character: split characters are held, not guessed.
    assert not any("\ufffd" in p for p in pieces)


def test_random_chunking_equals_full_decode(tok) -> None:
    rng = random.Random(0)
    text = " ".join(TEXTS)
    ids = tok.encode(text, add_special_tokens=False)
    for _ in range(20):
        sizes = [rng.randint(1, 4) for _ in ids]
        pieces, _ = _stream(tok, ids, sizes)
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_emoji_held_until_complete(tok) -> None:
    ids = tok.encode("a😀", add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    assert d.add(ids[:1]).text == "a"
    for i in ids[1:-1]:
        assert d.add([i]).text == ""  # partial emoji bytes stay held
    assert d.add(ids[-1:]).text == "😀"


def test_truncated_character_released_on_flush(tok) -> None:
    # Output that ends mid-character is still shown (as U+FFFD), like tokenizer.decode does.
    ids = tok.encode("ok 😀", add_special_tokens=False)[:-1]
    pieces, _ = _stream(tok, ids)
    assert "".join(pieces) == _decode(tok, ids)
    assert pieces[-1].endswith("\ufffd")


def test_skip_special_tokens(tok) -> None:
    ids = tok.encode("<|im_start|>hello 你好<|im_end|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    skipped, _ = _stream(tok, ids, skip_special_tokens=True)
    assert "".join(skipped) == "hello 你好"
    kept, _ = _stream(tok, ids, skip_special_tokens=False)
    assert "".join(kept) == "<|im_start|>hello 你好<|im_end|>"


def test_stop_string_across_token_boundaries(tok) -> None:
    text = "the quick brown fox ### jumps"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, stop=("fox ###",))
    emitted, stopped_at = [], None
    for k, i in enumerate(ids):
        step = d.add([i])
        emitted.append(step.text)
        assert "fox" not in "".join(emitted)  # the stop's start is held, never sent
        if step.stopped:
            stopped_at = k
            assert step.matched_stop == "fox ###"
            break
    assert stopped_at is not None
    assert "".join(emitted) == "the quick brown "
    # The stop spans several tokens, so it completed on a later token than it started on.
    assert len(tok.encode("fox ###", add_special_tokens=False)) > 1
    assert d.flush() == ""
    assert d.full_text == "the quick brown "
    assert d.add(ids[stopped_at + 1 :]).text == ""  # nothing after a stop


def test_stop_string_prefix_held_then_released(tok) -> None:
    ids = tok.encode("hello wor world", add_special_tokens=False)
    pieces, d = _stream(tok, ids, stop=("world!",))
    assert "".join(pieces) == "hello wor world"  # "world" never became "world!"
    assert not d.stopped
    # "world" could have been the start of "world!": it was only released by flush().
    assert pieces[-1].endswith("world")


def test_stop_string_inside_multibyte_text(tok) -> None:
    text = "héllo 中文😀 tail"
    ids = tok.encode(text, add_special_tokens=False)
    pieces, d = _stream(tok, ids, stop=("文😀",))
    assert "".join(pieces) == "héllo 中"
    assert d.stopped and d.full_text == "héllo 中"


def test_stop_matches_like_a_full_text_search(tok) -> None:
    # Oracle: the output is the full text cut at the earliest-completing stop string.
    rng = random.Random(1)
    text = "the quick brown fox jumps over the lazy dog, naïve café 你好 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    for _ in range(40):
        a = rng.randrange(len(text))
        stops = (text[a : a + rng.randint(1, 6)], "zzz", "dog!")
        pieces, d = _stream(tok, ids, [rng.randint(1, 3) for _ in ids], stop=stops)
        end, start = min((text.find(s) + len(s), text.find(s)) for s in stops if s in text)
        assert "".join(pieces) == text[:start], stops
        assert d.stopped


def test_stop_matcher_earliest_completion_wins() -> None:
    m = StopMatcher(("abcd", "c"))
    assert m.feed("ab") == ""  # could be "abcd"
    assert m.feed("cd") == "ab"
    assert m.matched == "c"


def test_window_stays_small(tok) -> None:
    # O(window) per token: the decoder never sees more than a few ids at a time.
    calls: list[int] = []

    class Spy:
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return tok.decode(ids, **kw)

    ids = tok.encode(" ".join(TEXTS) * 4, add_special_tokens=False)
    pieces, _ = _stream(Spy(), ids)
    assert "".join(pieces) == _decode(tok, ids)
    assert max(calls) <= 8


def test_sentencepiece_style_leading_space() -> None:
    # Metaspace decoders strip the first word's leading space; the window diff must not.
    from tokenizers import decoders, pre_tokenizers

    sp = _train(pre_tokenizers.Metaspace(), decoders.Metaspace())
    ids = sp.encode("hello world the fox", add_special_tokens=False)
    pieces, _ = _stream(sp, ids)
    assert "".join(pieces) == _decode(sp, ids) == "hello world the fox"
    # With prompt context, the first generated word keeps its space.
    prompt = sp.encode("the lazy dog", add_special_tokens=False)
    d = IncrementalDetokenizer(sp, context_token_ids=prompt)
    out = "".join(d.add([i]).text for i in ids) + d.flush()
    assert out == " hello world the fox"
