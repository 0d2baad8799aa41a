"""SamplingParams: defaults, normalization, and errors that name the offending field."""

from __future__ import annotations

import dataclasses

import pytest

from radixrt.sampling_params import SamplingParams


def test_defaults_are_valid_and_sampling() -> None:
    p = SamplingParams()
    assert p.max_new_tokens == 128 and p.temperature == 1.0 and p.stop == ()
    assert not p.is_greedy
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(top_k=1).is_greedy


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


def test_stop_normalized_to_tuple() -> None:
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b", "a"]).stop == ("a", "b")  # type: ignore[arg-type]
    assert SamplingParams(stop_token_ids=[5, 7]).stop_token_ids == (5, 7)  # type: ignore[arg-type]
    # Hashable and comparable once normalized: usable as a cache / dedup key.
    assert hash(SamplingParams(stop=["x"])) == hash(SamplingParams(stop=("x",)))  # type: ignore[arg-type]


def test_ints_coerced_to_float() -> None:
    p = SamplingParams(temperature=1, top_p=1, repetition_penalty=2)
    assert isinstance(p.temperature, float) and isinstance(p.repetition_penalty, float)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", -1),  # 0 is valid: prefill only
        ("max_new_tokens", 1.5),
        ("min_new_tokens", -1),
        ("min_new_tokens", 129),  # over max_new_tokens (128)
        ("no_stop_trim", 1),
        ("prompt_top_logprobs", 2),  # without prompt_logprobs
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("top_k", True),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("repetition_penalty", 0.0),
        ("seed", "7"),
        ("stop", ["ok", ""]),
        ("stop", 3),
        ("stop", ["ok", 3]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 5),
        ("ignore_eos", 1),
        ("logprobs", "yes"),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
        ("n", 0),
        ("n", 65),
        ("skip_special_tokens", None),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw",
    [
        {"top_k": 0},
        {"top_k": -1},
        {"top_k": 40},
        {"top_p": 1e-9},
        {"min_p": 1.0},
        {"frequency_penalty": -2.0, "presence_penalty": 2.0},
        {"repetition_penalty": 0.5},
        {"top_logprobs": 20, "logprobs": True},
        {"n": 64, "seed": 0},
    ],
)
def test_boundary_values_accepted(kw: dict) -> None:
    SamplingParams(**kw)


def test_validate_for_model() -> None:
    p = SamplingParams(stop_token_ids=(2, 99))
    p.validate_for_model(vocab_size=100, max_context=64, prompt_len=10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        p.validate_for_model(vocab_size=99, max_context=64, prompt_len=10)
    with pytest.raises(ValueError, match="prompt_len"):
        p.validate_for_model(vocab_size=100, max_context=64, prompt_len=64)
    with pytest.raises(ValueError, match="prompt"):
        p.validate_for_model(vocab_size=100, max_context=64, prompt_len=0)
    # Asking for more tokens than fit is allowed: generation stops at the context limit.
    SamplingParams(max_new_tokens=1000).validate_for_model(100, 64, 63)


def test_with_seed_offset() -> None:
    p = SamplingParams(n=4, seed=10, temperature=0.7, stop="x")
    kids = [p.with_seed_offset(i) for i in range(4)]
    assert [k.seed for k in kids] == [10, 11, 12, 13]
    assert all(k.n == 1 and k.temperature == 0.7 and k.stop == ("x",) for k in kids)
    assert SamplingParams(n=3).with_seed_offset(2).seed is None


@pytest.mark.parametrize("kw,field", [
    ({"seed": 2**64 - 1, "n": 2}, "seed"),  # sample 1 would use seed 2^64
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"top_k": 2**31}, "top_k"),
    ({"logprob_start_len": 2**70}, "logprob_start_len"),
    ({"max_new_tokens": 2**63}, "max_new_tokens"),
    ({"temperature": 1e-300}, "temperature"),
    ({"temperature": 10**400}, "temperature"),  # an int too large for a float
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"stop": [f"s{i}" for i in range(65)]}, "stop"),
    ({"stop": "x" * 1025}, "stop"),
    ({"stop_token_ids": [2**31]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
])
def test_64_bit_and_numeric_limits(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_largest_seeds_still_valid_for_every_sample() -> None:
    p = SamplingParams(seed=2**64 - 3, n=3)
    assert [p.with_seed_offset(i).seed for i in range(3)] == [2**64 - 3, 2**64 - 2, 2**64 - 1]
    SamplingParams(top_k=2**31 - 1, logprob_start_len=2**31 - 1, temperature=1e-6,
                   stop=["x" * 1024] * 2)
