"""radixrt.constrained: compile cache, matcher (advance / rollback / fork), batch bitmask,
logit bias; every grammar-guided output (hypothesis regexes and schemas included) parses."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixrt.constrained.batch import MaskBuilder
from radixrt.constrained.bias import apply_logit_bias
from radixrt.constrained.grammar import GrammarCompiler, GrammarError, check_syntax, tokenizer_info
from radixrt.constrained.matcher import Matcher
from radixrt.kernels.token_bitmask import apply_token_bitmask
from tests.fixtures import json_schema_check as jsonschema
from tests.fixtures.tiny_models import EOS_ID, TINY_VOCAB, build_tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="module")
def compiler(tok: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer_info(tok, TINY_VOCAB), timeout_s=60)


def walk(compiler: GrammarCompiler, kind: str, text: str, seed: int, max_steps: int = 200,
         batch: int = 1) -> list[list[int]]:
    """Random walks through the grammar: each step draws from random logits masked by the
    batch bitmask, exactly as the sampler would; returns each row's tokens (stop excluded)."""
    cg = compiler.compile((kind, text))
    matchers = [Matcher(cg) for _ in range(batch)]
    builder = MaskBuilder(TINY_VOCAB, "cpu")
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = [[] for _ in range(batch)]
    live = list(range(batch))
    for _ in range(max_steps):
        if not live:
            break
        rows: list[Matcher | None] = [matchers[i] for i in live]
        mask = builder.fill(rows)
        assert mask is not None
        logits = torch.randn(len(live), TINY_VOCAB, generator=gen)
        apply_token_bitmask(logits, mask)
        # Prefer ending once allowed, so walks finish: the stop token gets a boost.
        logits[:, EOS_ID] += 2.0
        picks = logits.argmax(-1).tolist()
        still = []
        for i, t in zip(live, picks):
            assert torch.isfinite(logits[live.index(i), t]), "an all-masked row"
            assert matchers[i].advance(t), f"masked draw {t} rejected by the grammar"
            if t == EOS_ID:
                assert matchers[i].is_terminated
            else:
                out[i].append(t)
                still.append(i)
        live = still
    assert not live, "a walk did not finish within max_steps"
    return out


def test_compile_cache_hits_and_bad_grammars(compiler: GrammarCompiler) -> None:
    key = ("regex", "[ab]{2,4}")
    a = compiler.compile(key)
    hits = compiler.hits
    assert compiler.compile(key) is a and compiler.hits == hits + 1
    with pytest.raises(GrammarError, match="regex"):
        compiler.compile(("regex", "a(b"))
    for kind, text in [("regex", "a(b"), ("ebnf", "root ::= x"), ("json_schema", '{"type": 1}')]:
        with pytest.raises(GrammarError, match=kind):
            check_syntax(kind, text)


def test_regex_walks_match(compiler: GrammarCompiler, tok: Any) -> None:
    pattern = r"(yes|no|maybe) [0-9]{1,3}"
    for seq in walk(compiler, "regex", pattern, seed=1, batch=12):
        assert re.fullmatch(pattern, tok.decode(seq)), tok.decode(seq)


def test_matcher_rollback_and_fork(compiler: GrammarCompiler, tok: Any) -> None:
    cg = compiler.compile(("regex", "abc|abd"))
    m = Matcher(cg)
    ids = tok.encode("ab", add_special_tokens=False)
    for t in ids:
        assert m.advance(t)
    child = m.fork()
    c = tok.encode("c", add_special_tokens=False)[0]
    d = tok.encode("d", add_special_tokens=False)[0]
    assert m.advance(c) and child.advance(d), "forks walk independently"
    m.rollback(1)
    assert m.num_accepted == len(ids)
    assert m.advance(d)
    assert not Matcher(cg).advance(d) or len(tok.encode("d")) == 0  # 'd' cannot start it
    assert m.advance(EOS_ID) and m.is_terminated


SCHEMA_LEAVES = st.sampled_from([
    {"type": "integer"}, {"type": "boolean"}, {"type": "string", "maxLength": 6},
    {"enum": ["red", "green", 3]}, {"type": "number"}, {"type": "null"},
    {"type": "integer", "minimum": -5, "maximum": 40},
])


def _schemas() -> st.SearchStrategy[dict[str, Any]]:
    def objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        props = st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), children,
                                min_size=1, max_size=3)
        return st.one_of(
            props.map(lambda p: {"type": "object", "properties": p, "required": sorted(p),
                                 "additionalProperties": False}),
            children.map(lambda c: {"type": "array", "items": c, "maxItems": 3}))
    return st.recursive(SCHEMA_LEAVES, objects, max_leaves=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schemas(), seed=st.integers(0, 2**31))
def test_hypothesis_schemas_walks_validate(compiler: GrammarCompiler, tok: Any,
                                           schema: dict[str, Any], seed: int) -> None:
    for seq in walk(compiler, "json_schema", json.dumps(schema), seed=seed, max_steps=400,
                    batch=2):
        jsonschema.validate(json.loads(tok.decode(seq)), schema)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(["[a-c]", "[0-9]{1,2}", "(x|yz)", "-", "q?", "[ab]+"]),
                      min_size=1, max_size=5), seed=st.integers(0, 2**31))
def test_hypothesis_regex_walks_match(compiler: GrammarCompiler, tok: Any, parts: list[str],
                                      seed: int) -> None:
    pattern = "".join(parts)
    for seq in walk(compiler, "regex", pattern, seed=seed, max_steps=300):
        assert re.fullmatch(pattern, tok.decode(seq)), (pattern, tok.decode(seq))


def test_ebnf_walks(compiler: GrammarCompiler, tok: Any) -> None:
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9] | "x"'
    for seq in walk(compiler, "ebnf", grammar, seed=3, batch=10):  # >= 8 rows: batch fill
        assert re.fullmatch(r"\(([0-9]|x)(,([0-9]|x))*\)", tok.decode(seq))


def test_mask_builder_leaves_unconstrained_rows(compiler: GrammarCompiler) -> None:
    m = Matcher(compiler.compile(("regex", "[0-9]")))
    mask = MaskBuilder(TINY_VOCAB, "cpu").fill([None, m, None])
    assert mask is not None and mask.shape == (3, (TINY_VOCAB + 31) // 32)
    assert (mask[0] == -1).all() and (mask[2] == -1).all() and not (mask[1] == -1).all()
    assert MaskBuilder(TINY_VOCAB, "cpu").fill([None, None]) is None


def test_mask_builder_ring_reuse_and_batch_fill(compiler: GrammarCompiler, tok: Any) -> None:
    """Batch fills (>= BATCH_FILL_MIN_ROWS rows, on the fill thread) into reused ring buffers
    that hold a previous step's words: every row equals a fresh single-row fill, and rows
    without a grammar are all ones, whatever pattern of rows the step before had."""
    cg = compiler.compile(("json_schema", json.dumps({"type": "object"})))
    ms = [Matcher(cg) for _ in range(12)]
    prefix = tok.encode('{"a', add_special_tokens=False)
    for m in ms[::2]:  # two grammar states in the batch
        for t in prefix:
            assert m.advance(t)
    builder = MaskBuilder(TINY_VOCAB, "cpu")
    words = (TINY_VOCAB + 31) // 32
    patterns = [list(range(12)), [i for i in range(12) if i % 3], list(range(12)),
                [i for i in range(12) if i != 5]]
    for step, keep in enumerate(patterns):
        rows: list[Matcher | None] = [ms[i] if i in keep else None for i in range(12)]
        got = builder.finish(builder.start(rows))
        assert got is not None
        ref = torch.full((12, words), -1, dtype=torch.int32)
        for i in keep:
            ms[i].fill(ref, i)
        assert torch.equal(got, ref), f"step {step}: rows differ from a fresh fill"


def test_advance_on_arrival_waits_for_the_tokens(compiler: GrammarCompiler, tok: Any) -> None:
    """The fused path's early advance: the fill threads wait for a step's tokens (here until
    the test releases them), advance each matcher by its row of them, and the next mask,
    queued behind, equals a fill after a plain advance; a token the grammar refuses fails
    only its own matcher."""
    import threading

    import numpy as np

    cg = compiler.compile(("regex", "[0-9]+x"))
    digit, letter = (tok.encode(c, add_special_tokens=False)[0] for c in "7q")
    ms, ref = [Matcher(cg, shard=i) for i in range(12)], [Matcher(cg) for _ in range(12)]
    drawn = np.array([letter if i == 4 else digit for i in range(12)] + [0], dtype=np.int64)
    builder = MaskBuilder(TINY_VOCAB, "cpu", threads=3, fused=True)
    landed = threading.Event()

    def host_tokens() -> np.ndarray:
        assert landed.wait(10), "the test never released the tokens"
        return drawn

    order = list(range(12))[::-1]  # row i of the step draws row 11 - i of the tokens
    builder.advance_on_arrival([(ms[i], 11 - i) for i in order], host_tokens)
    assert builder.stats.arrivals == 0, "an advance ran before its tokens landed"
    landed.set()
    for i in order:
        ms[i]._record(int(drawn[11 - i]), int(drawn[11 - i]) == digit)
    got = builder.finish(builder.advance_and_start((), list(ms), queued=True))
    builder.drain()  # the advances themselves
    assert builder.stats.arrivals == 3
    assert [m.failed for m in ms] == [i == 7 for i in range(12)]
    for i, m in enumerate(ref):
        assert m.advance(int(drawn[11 - i])) is (i != 7)
    want = builder.finish(builder.start([None if m.done else m for m in ref]))
    assert got is not None and want is not None and torch.equal(got, want)
    builder.close()


def test_grammar_copies_fill_the_same_masks(compiler: GrammarCompiler, tok: Any) -> None:
    """A fill thread's private copy of a grammar (``compile_copy``) is its own object, cached
    per copy number (0 is the shared one), and walks and masks exactly as the shared one."""
    key = ("json_schema", json.dumps({"type": "object"}))
    shared, copy = compiler.compile(key), compiler.compile_copy(key, 1)
    assert compiler.compile_copy(key, 0) is shared and compiler.compile_copy(key, 1) is copy
    assert copy is not shared and compiler.compile_copy(key, 2) is not copy
    a, b = Matcher(shared), Matcher(copy)
    words = (TINY_VOCAB + 31) // 32
    for t in [*tok.encode('{"ab": 12}', add_special_tokens=False), EOS_ID]:
        ma, mb = torch.zeros(1, words, dtype=torch.int32), torch.zeros(1, words, dtype=torch.int32)
        a.fill(ma, 0)
        b.fill(mb, 0)
        assert torch.equal(ma, mb)
        assert a.advance(t) and b.advance(t)
    assert a.is_terminated and b.is_terminated


def test_batch_accept_reports_only_refusals(compiler: GrammarCompiler, tok: Any) -> None:
    """The fill threads' accept: None when every token is accepted, else per matcher whether
    it was (a refused token leaves its matcher where it was)."""
    from radixrt.constrained.batch import batch_accept

    cg = compiler.compile(("regex", "[0-9]+"))
    digit, letter = (tok.encode(c, add_special_tokens=False)[0] for c in "7x")
    ms = [Matcher(cg) for _ in range(3)]
    assert batch_accept([m.raw for m in ms], [digit] * 3) is None
    assert batch_accept([m.raw for m in ms], [digit, letter, digit]) == [True, False, True]
    assert ms[1].raw.accept_token(digit) and not ms[1].raw.accept_token(letter)


def test_advance_batch_matches_advance(compiler: GrammarCompiler, tok: Any) -> None:
    cg = compiler.compile(("regex", "[0-9]+"))
    one, batch = [Matcher(cg) for _ in range(3)], [Matcher(cg) for _ in range(3)]
    digit, letter = tok.encode("7", add_special_tokens=False)[0], tok.encode("x",
                                                                             add_special_tokens=False)[0]
    toks = [digit, letter, digit]
    oks = Matcher.advance_batch(batch, toks)
    assert oks == [m.advance(t) for m, t in zip(one, toks)] == [True, False, True]
    assert [m.num_accepted for m in batch] == [m.num_accepted for m in one] == [1, 0, 1]
    assert [m.failed for m in batch] == [False, True, False]


def test_logit_bias_adds_per_row() -> None:
    x = torch.zeros(3, 10)
    apply_logit_bias(x, [((1, -100.0), (4, 2.5)), (), ((9, 100.0),)])
    want = torch.zeros(3, 10)
    want[0, 1], want[0, 4], want[2, 9] = -100.0, 2.5, 100.0
    assert torch.equal(x, want)


def test_cpu_bitmask_apply_equals_the_torch_reference() -> None:
    from radixrt.kernels.token_bitmask import apply_token_bitmask_torch

    x = torch.randn(7, 1000)
    m = torch.randint(-2**31, 2**31 - 1, (7, 32), dtype=torch.int32)
    a, b = x.clone(), x.clone()
    apply_token_bitmask(a, m)  # xgrammar's C++ loop on the CPU
    apply_token_bitmask_torch(b, m)
    assert torch.equal(a, b)


SCHEMA_CHECK_CASES = [
    ({"type": "integer", "minimum": 0, "maximum": 9}, 5, True),
    ({"type": "integer"}, True, False),
    ({"type": "integer"}, 2.5, False),
    ({"type": "number", "exclusiveMaximum": 1}, 1, False),
    ({"type": "string", "maxLength": 3}, "abcd", False),
    ({"type": "string", "minLength": 2, "pattern": "^[0-9]+$"}, "12", True),
    ({"type": "string", "pattern": "[0-9]{5}"}, "12a45", False),
    ({"enum": ["a", 3]}, 3.0, True),
    ({"enum": [1]}, True, False),
    ({"const": "x"}, "y", False),
    ({"type": "null"}, None, True),
    ({"type": "array", "items": {"type": "boolean"}, "maxItems": 2}, [True, False, True], False),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
      "additionalProperties": False}, {"a": 1, "b": 2}, False),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {}, False),
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, {"a": 1, "b": 2}, True),
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, [], False),
    ({"anyOf": [{"type": "object", "properties": {"name": {"const": "f"}},
                 "required": ["name"]}]}, {"name": "f"}, True),
]


@pytest.mark.parametrize("schema,value,ok", SCHEMA_CHECK_CASES)
def test_test_validator_verdicts(schema: dict[str, Any], value: Any, ok: bool) -> None:
    """tests/fixtures/json_schema_check (what the structured tests validate with, so they run
    without the jsonschema package) accepts and rejects as the JSON-schema spec says, and as
    the jsonschema package does where it is installed."""
    def passes(validate: Any) -> bool:
        try:
            validate(value, schema)
        except AssertionError:
            return False
        except Exception as e:  # jsonschema's ValidationError is not an AssertionError
            if type(e).__name__ != "ValidationError":
                raise
            return False
        return True

    assert passes(jsonschema.validate) is ok
    try:
        import jsonschema as reference
    except ImportError:
        return
    assert passes(reference.validate) is ok
    with pytest.raises(NotImplementedError):
        jsonschema.validate(1, {"multipleOf": 2})
