"""Sampler: filters, penalties, logprobs and seeded reproducibility (CPU; GPU when present)."""

from __future__ import annotations

import math

import pytest
import torch

from radixrt.engine.sampler import Sampler, SamplerRow, make_generator
from radixrt.sampling_params import SamplingParams

V = 50
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def row(params: SamplingParams, prompt=(), output=(), device="cpu") -> SamplerRow:
    gen = None if params.seed is None else make_generator(params.seed, device)
    return SamplerRow(params, gen, list(prompt), list(output))


def rand_logits(b: int, seed: int = 0, device: str = "cpu", v: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, v, generator=g) * 3).to(device)


@pytest.fixture
def sampler() -> Sampler:
    return Sampler()


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(sampler, device) -> None:
    logits = rand_logits(6, device=device)
    out = sampler.sample(logits, [row(SamplingParams(temperature=0.0))] * 6)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_greedy_tie_takes_lowest_id(sampler) -> None:
    logits = torch.zeros(1, V)
    logits[0, [7, 3, 20]] = 5.0
    assert sampler.sample(logits, [row(SamplingParams(temperature=0.0))]).token_ids == [3]


def test_top_k_1_and_tiny_top_p_equal_greedy(sampler) -> None:
    logits = rand_logits(8, seed=1)
    expect = logits.argmax(-1).tolist()
    for p in (
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6, seed=3),
        SamplingParams(min_p=1.0),
    ):
        assert sampler.sample(logits, [row(p)] * 8).token_ids == expect, p


def test_top_k_restricts_support(sampler) -> None:
    logits = rand_logits(1, seed=2).expand(400, V).contiguous()
    top3 = set(logits[0].topk(3).indices.tolist())
    torch.manual_seed(0)
    out = sampler.sample(logits, [row(SamplingParams(top_k=3, temperature=2.0))] * 400)
    assert set(out.token_ids) == top3  # only the top 3, and (400 draws) each of them


def test_top_p_keeps_smallest_nucleus(sampler) -> None:
    # probs 0.5, 0.3, 0.15, 0.05: top_p=0.7 needs the first two (0.5 < 0.7 <= 0.8).
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(300, 4).contiguous()
    torch.manual_seed(0)
    out = sampler.sample(logits, [row(SamplingParams(top_p=0.7))] * 300)
    assert set(out.token_ids) == {0, 1}


def test_min_p_filters_relative_to_max(sampler) -> None:
    # min_p=0.25 keeps p >= 0.25 * 0.4 = 0.1: tokens 0, 1, 2 (0.4, 0.3, 0.2); drops 0.07, 0.03.
    probs = torch.tensor([0.4, 0.3, 0.2, 0.07, 0.03])
    logits = probs.log().expand(400, 5).contiguous()
    torch.manual_seed(0)
    out = sampler.sample(logits, [row(SamplingParams(min_p=0.25))] * 400)
    assert set(out.token_ids) == {0, 1, 2}


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_ignores_batch_composition(sampler, device) -> None:
    target = rand_logits(1, seed=5, device=device)
    params = SamplingParams(temperature=1.3, top_p=0.9, seed=1234)

    def run(batch_before: int, batch_after: int, others_seeded: bool, steps: int = 5) -> list[int]:
        row_t = row(params, device=device)  # fresh generator: same seed, same stream
        toks = []
        for s in range(steps):
            others = [
                row(
                    SamplingParams(seed=s + j) if others_seeded else SamplingParams(), device=device
                )
                for j in range(batch_before + batch_after)
            ]
            rows = others[:batch_before] + [row_t] + others[batch_before:]
            logits = torch.cat(
                [
                    rand_logits(batch_before, 9 + s, device),
                    target,
                    rand_logits(batch_after, 7, device),
                ]
            )
            toks.append(sampler.sample(logits, rows).token_ids[batch_before])
        return toks

    alone = run(0, 0, False)
    assert run(3, 0, False) == alone
    assert run(0, 4, True) == alone
    assert run(2, 5, True) == alone


def test_different_seeds_differ(sampler) -> None:
    # Near-uniform logits: 20 independent seeds all picking the same token has prob 50**-19.
    logits = torch.zeros(20, V)
    rows = [row(SamplingParams(seed=s)) for s in range(20)]
    assert len(set(sampler.sample(logits, rows).token_ids)) > 5


def test_temperature_frequencies_match_softmax(sampler) -> None:
    # Chi-square goodness of fit on a 6-token distribution at temperature 0.7.
    v, n, temp = 6, 6000, 0.7
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    expected = torch.softmax(logits[0] / temp, -1) * n
    gen = make_generator(42, "cpu")
    params = SamplingParams(temperature=temp, seed=42)
    counts = torch.zeros(v)
    batch = 500
    for _ in range(n // batch):  # one generator, many rows of a batch share it sequentially
        out = sampler.sample(
            logits.expand(batch, v).contiguous(), [SamplerRow(params, gen, [], [])] * batch
        )
        counts += torch.bincount(torch.tensor(out.token_ids), minlength=v)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (chi2, counts, expected)  # p ~ 0.001 for 5 degrees of freedom


def test_repetition_penalty_hf_formula(sampler) -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    p = SamplingParams(repetition_penalty=2.0, logprobs=True)
    out = sampler.sample(logits, [row(p, prompt=[0, 1], output=[1, 3])])
    # seen {0, 1, 3}: positive divided, negative multiplied; 2 and 4 untouched.
    expect = torch.tensor([1.0, -4.0, 1.0, -2.0, 0.5])
    assert out.logprobs == pytest.approx(
        [torch.log_softmax(expect, -1)[out.token_ids[0]].item()], abs=1e-6
    )
    assert torch.allclose(Sampler._apply_penalties(logits, [row(p, [0, 1], [1, 3])]), expect[None])


def test_frequency_presence_penalty_openai_formula(sampler) -> None:
    logits = torch.zeros(2, 5)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    rows = [row(p, prompt=[4, 4, 4], output=[1, 1, 1, 2]), row(SamplingParams(), output=[1, 1])]
    got = Sampler._apply_penalties(logits, rows)
    # token 1: 3 * 0.5 + 1.0; token 2: 0.5 + 1.0; prompt token 4 is not counted; row 1 untouched.
    assert torch.equal(got[0], torch.tensor([0.0, -2.5, -1.5, 0.0, 0.0]))
    assert torch.equal(got[1], torch.zeros(5))
    # And greedy follows the penalized logits.
    greedy = SamplingParams(temperature=0.0, presence_penalty=2.0)
    out = sampler.sample(torch.tensor([[1.0, 0.0, 0.9]]), [row(greedy, output=[0])])
    assert out.token_ids == [2]


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_match_log_softmax_before_temperature(sampler, device) -> None:
    logits = rand_logits(4, seed=3, device=device)
    params = [
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5),
        SamplingParams(temperature=1.5, seed=1, logprobs=True, top_logprobs=2),
        SamplingParams(temperature=0.5, seed=2),  # asked for nothing: still well-formed
        SamplingParams(temperature=0.8, seed=3, logprobs=True, top_logprobs=20),
    ]
    out = sampler.sample(logits, [row(p, device=device) for p in params])
    ref = torch.log_softmax(logits.float().cpu(), -1)
    assert out.logprobs is not None and out.top_logprobs is not None
    for b, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp == pytest.approx(ref[b, tok].item(), abs=1e-5)
    assert [len(t) for t in out.top_logprobs] == [5, 2, 0, 20]
    for b, top in enumerate(out.top_logprobs):
        vals = [v for _, v in top]
        assert vals == sorted(vals, reverse=True)
        want = ref[b].topk(len(top))
        assert [i for i, _ in top] == want.indices.tolist()
        assert vals == pytest.approx(want.values.tolist(), abs=1e-5)
    assert out.top_logprobs[0][0][0] == out.token_ids[0]  # greedy picks its own top-1


def test_no_nan_with_extreme_filters(sampler) -> None:
    logits = torch.full((3, V), -math.inf)
    logits[:, 11] = 0.0  # everything but one token already masked
    logits[2] = rand_logits(1, seed=4)[0]
    logits[2, 5] = 1e4  # one token dominates completely
    params = [
        SamplingParams(top_p=1e-9, top_k=3, min_p=1.0, seed=1, logprobs=True),
        SamplingParams(
            temperature=1e-4, repetition_penalty=1.5, frequency_penalty=2.0, logprobs=True
        ),
        SamplingParams(temperature=5.0, top_k=V, top_p=0.5, logprobs=True, top_logprobs=3),
    ]
    out = sampler.sample(logits, [row(p, prompt=[11], output=[11, 5]) for p in params])
    assert out.token_ids == [11, 11, 5]
    assert out.logprobs is not None and all(not math.isnan(x) for x in out.logprobs)
    assert out.logprobs[0] == 0.0


def test_caller_logits_untouched(sampler) -> None:
    logits = rand_logits(2, seed=6)
    before = logits.clone()
    p = SamplingParams(
        repetition_penalty=1.3,
        presence_penalty=1.0,
        temperature=0.5,
        top_k=4,
        top_p=0.8,
        min_p=0.1,
        seed=0,
    )
    sampler.sample(logits, [row(p, [1, 2], [3])] * 2)
    assert torch.equal(logits, before)


def test_prompt_logprobs(sampler) -> None:
    logits = rand_logits(7, seed=8)
    nxt = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    got, none = sampler.prompt_logprobs(logits, nxt)
    full = torch.log_softmax(logits, -1)
    ref = full[torch.arange(7), nxt]
    assert got == pytest.approx(ref.tolist(), abs=1e-6) and none == []
    same, tops = sampler.prompt_logprobs(logits, nxt, top_k=3)
    assert same == got and len(tops) == 7
    for pos, top in enumerate(tops):
        vals, ids = full[pos].topk(3)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-6)


def test_top_k_fast_path_matches_full_sort_path(sampler) -> None:
    # A batch where every row has top_k takes the topk path; adding one top_k-off row forces the
    # full sort. The seeded row must draw the same tokens either way.
    logits = rand_logits(2, seed=11)
    p = SamplingParams(temperature=1.5, top_k=7, top_p=0.8, seed=99)
    fast = sampler.sample(logits, [row(p), row(SamplingParams(top_k=3))])
    full = sampler.sample(logits, [row(p), row(SamplingParams(top_p=0.5))])
    assert fast.token_ids[0] == full.token_ids[0]
    big_k = SamplingParams(top_k=10 * V, seed=1)  # larger than the vocabulary: no cut
    assert (
        sampler.sample(logits[:1], [row(big_k)]).token_ids
        == sampler.sample(logits[:1], [row(SamplingParams(seed=1))]).token_ids
    )


def test_penalties_with_repeated_tokens_in_batch(sampler) -> None:
    # Rows with and without penalties, duplicated history entries, and a row whose history
    # repeats the same token: each row is penalized by its own history only.
    logits = torch.tensor([[1.0, 2.0, -1.0], [1.0, 2.0, -1.0], [1.0, 2.0, -1.0]])
    rows = [
        row(SamplingParams(repetition_penalty=4.0), prompt=[1, 1], output=[2, 2, 2]),
        row(SamplingParams()),
        row(SamplingParams(frequency_penalty=1.0, presence_penalty=0.5), output=[0, 0, 1]),
    ]
    got = Sampler._apply_penalties(logits, rows)
    assert torch.equal(got[0], torch.tensor([1.0, 0.5, -4.0]))
    assert torch.equal(got[1], logits[1])
    assert torch.equal(got[2], torch.tensor([1.0 - 2.0 - 0.5, 2.0 - 1.0 - 0.5, -1.0]))
