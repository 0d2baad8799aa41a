"""Regression tests for three scheduler bugs (issue 11) and the seed defence (issue 13), on the
counting model (tests/fixtures/counting.py), whose every token and logprob is known exactly."""

from __future__ import annotations

import random

import pytest
import torch

from radixrt.engine.sampler import make_generator
from radixrt.sampling_params import SamplingParams
from tests.fixtures.counting import VOCAB, build, prompt_logprob_reference, reference


def greedy(max_new: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=max_new, **kw)


def test_retraction_takes_the_newest_running_sequence_even_when_it_asks() -> None:
    """The newest decoding sequence is short of a page with no cache to evict: it must retract
    itself, not the older request (which used to be retracted so the newest could go on)."""
    sched = build(page_size=4, pages=8, chunk=8, cache=False)
    rng = random.Random(1)
    old = [rng.randrange(VOCAB) for _ in range(8)]
    new = [rng.randrange(VOCAB) for _ in range(10)]  # crosses page boundaries at other steps
    sched.add_request("old", old, greedy(20))
    sched.add_request("new", new, greedy(20))
    outputs: dict[str, list[int]] = {"old": [], "new": []}
    first_retraction_step = None
    while sched.has_work():
        before = sched.stats().retractions
        deltas = sched.step()
        for d in deltas:
            outputs[d.rid].extend(d.new_token_ids)
        if first_retraction_step is None and sched.stats().retractions > before:
            first_retraction_step = {d.rid for d in deltas}
    assert first_retraction_step is not None, "the pool was sized to force a retraction"
    assert first_retraction_step == {"old"}, (
        f"the step that retracted produced tokens for {first_retraction_step}: the newest "
        "request must be the victim and the older one keep decoding"
    )
    assert outputs["old"] == reference(old, 20, None)[0]
    assert outputs["new"] == reference(new, 20, None)[0]


def test_prompt_logprobs_survive_a_retraction_mid_prefill() -> None:
    """A prompt-logprob request retracted half-way through its (1-token-chunk) prefill resumes
    while another request holds its whole prompt in the tree. Its cached prefix must again be
    capped at the first unscored position: every one of its 42 entries present and exact."""
    rng = random.Random(0)
    prompt = [rng.randrange(VOCAB) for _ in range(42)]
    decoders = [[rng.randrange(VOCAB) for _ in range(3)] for _ in range(3)]
    sched = build(page_size=1, pages=160, chunk=1, max_prefill=1, max_running=16)
    sched.add_request("holder", prompt, greedy(60))  # caches the prompt, locked while it decodes
    got: list[float | None] | None = None
    outputs: dict[str, list[int]] = {}
    step, holder_decoding, asked = 0, None, False
    while sched.has_work():
        for d in sched.step():
            outputs.setdefault(d.rid, []).extend(d.new_token_ids)
            if d.rid == "holder" and d.new_token_ids and holder_decoding is None:
                holder_decoding = step
                for i, ids in enumerate(decoders):  # their growth outruns the reserve
                    sched.add_request(f"d{i}", ids, greedy(60))
            if d.rid == "scored" and d.prompt_logprobs is not None:
                got = d.prompt_logprobs
        step += 1
        if holder_decoding is not None and not asked and step >= holder_decoding + 5:
            sched.add_request("scored", prompt, greedy(2, prompt_logprobs=True))
            asked = True
    assert sched.stats().retractions > 0, "the pool was sized to retract mid-prefill"
    assert got is not None and len(got) == len(prompt), (
        f"{None if got is None else len(got)} prompt logprobs for a {len(prompt)}-token prompt"
    )
    want = prompt_logprob_reference(prompt)
    assert got[0] is None
    assert got[1:] == pytest.approx(want[1:], abs=1e-4), "values differ from an unpressured run"
    assert outputs["scored"] == reference(prompt, 2, None)[0]


@pytest.mark.parametrize("salts,admitted", [(("a", "b"), 2), (("a", "a"), 1)])
def test_in_batch_dedupe_is_per_namespace(salts: tuple[str, str], admitted: int) -> None:
    """Two requests with the same uncached 40-token stem arrive together: the second waits
    for the first's KV only in the same namespace (another tenant could never hit it)."""
    rng = random.Random(2)
    prompt = [rng.randrange(VOCAB) for _ in range(40)]
    sched = build(page_size=4, pages=64, chunk=64, max_prefill=128)
    for i, salt in enumerate(salts):
        sched.add_request(f"r{i}", prompt, greedy(3), salt)
    sched.step()
    stats = sched.stats()
    assert (stats.running_requests, stats.queued_requests) == (admitted, 2 - admitted)
    outputs: dict[str, list[int]] = {}
    while sched.has_work():
        for d in sched.step():
            outputs.setdefault(d.rid, []).extend(d.new_token_ids)
    assert sched.stats().running_requests == 0


def test_make_generator_wraps_any_seed_into_torch_range() -> None:
    def draw(seed: int) -> torch.Tensor:
        return torch.rand(4, generator=make_generator(seed, "cpu"))

    assert torch.equal(draw(2**64 + 5), draw(5))
    assert torch.equal(draw(-1), draw(2**64 - 1))


def test_a_seed_whose_samples_overflow_is_rejected_before_queueing() -> None:
    """Sample i of an n > 1 request draws with seed + i, made inside the fork mid-step; a
    request whose last sample would pass 2^64 - 1 is refused by add_request (nothing queued),
    even if its params skipped their own validation."""
    sched = build(page_size=4, pages=32, chunk=8)
    params = SamplingParams(temperature=1.0, max_new_tokens=2, seed=2**64 - 1)
    object.__setattr__(params, "n", 2)  # as if built without __post_init__ (e.g. a bad decoder)
    with pytest.raises(ValueError, match="seed"):
        sched.add_request("r", [1, 2, 3], params)
    assert not sched.has_work()
    # The largest seed that fits n = 2 forks and samples fine.
    sched.add_request("ok", [1, 2, 3], SamplingParams(temperature=1.0, max_new_tokens=2,
                                                      seed=2**64 - 2, n=2))
    seen = set()
    while sched.has_work():
        seen.update((d.rid, d.index) for d in sched.step() if d.finished)
    assert seen == {("ok", 0), ("ok", 1)}
