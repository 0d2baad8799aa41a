"""radixrt's models reproduce transformers' logits (fp32, CPU) through the paged KV pool:
prefill, prefill on top of a cached prefix, decode, and ragged multi-request steps."""

from __future__ import annotations

import pytest
import torch

from radixrt.models import MODEL_REGISTRY, SUPPORTED_ARCHITECTURES, load_model
from radixrt.models.layers import apply_rope_torch, rms_norm_torch
from tests.fixtures.tiny_models import (
    MODEL_VARIANTS,
    TINY_VOCAB,
    PagedRunner,
    TinyModelDir,
    hf_logits,
    load_hf_model,
)

ATOL = 1e-4
RTOL = 1e-4


def _prompt(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY_VOCAB, (length,), generator=gen).tolist()


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    # The tiny models' logits span O(1): tolerance relative to their scale.
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(ours, ref, atol=ATOL * scale, rtol=RTOL)


@pytest.fixture(scope="module", params=MODEL_VARIANTS)
def pair(request: pytest.FixtureRequest, tiny_model_dir: TinyModelDir):  # type: ignore[no-untyped-def]
    directory = tiny_model_dir(request.param)
    return load_model(directory).model, load_hf_model(directory)


def test_registry_covers_supported_architectures() -> None:
    assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("page_size", [1, 16])
def test_prefill_from_empty(pair, page_size: int) -> None:  # type: ignore[no-untyped-def]
    ours, hf = pair
    prompt = _prompt(0, 37)
    logits = PagedRunner(ours, page_size=page_size).step({0: prompt}, all_logits=True)[0]
    _close(logits, hf_logits(hf, prompt))


@pytest.mark.parametrize("page_size", [1, 16])
def test_prefill_suffix_on_cached_prefix(pair, page_size: int) -> None:  # type: ignore[no-untyped-def]
    ours, hf = pair
    # Prefix of 21 tokens ends mid-page for page_size 16: the suffix continues that page.
    prompt = _prompt(1, 50)
    runner = PagedRunner(ours, page_size=page_size)
    runner.step({0: prompt[:21]})
    suffix_logits = runner.step({0: prompt[21:]}, all_logits=True)[0]
    _close(suffix_logits, hf_logits(hf, prompt)[21:])


def test_decode_steps(pair) -> None:  # type: ignore[no-untyped-def]
    ours, hf = pair
    seq = _prompt(2, 12) + _prompt(3, 20)
    runner = PagedRunner(ours, page_size=4)
    runner.step({0: seq[:12]})
    decoded = [runner.step({0: [tok]})[0][0] for tok in seq[12:]]
    _close(torch.stack(decoded), hf_logits(hf, seq)[12:])


def test_greedy_decode_follows_reference(pair) -> None:  # type: ignore[no-untyped-def]
    ours, hf = pair
    seq = _prompt(4, 9)
    runner = PagedRunner(ours, page_size=16)
    logits = runner.step({0: seq})[0]
    for _ in range(8):
        seq.append(int(logits[-1].argmax()))
        logits = runner.step({0: [seq[-1]]})[0]
    ref = hf_logits(hf, seq)
    # Each generated token is the reference's argmax at the step before it.
    assert seq[9:] == ref[8:-1].argmax(-1).tolist()


@pytest.mark.parametrize("page_size", [1, 16])
def test_ragged_batch_one_step(pair, page_size: int) -> None:  # type: ignore[no-untyped-def]
    ours, hf = pair
    seqs = {0: _prompt(10, 40), 1: _prompt(11, 25), 2: _prompt(12, 18), 3: _prompt(13, 7)}
    runner = PagedRunner(ours, page_size=page_size)
    # Warm-up step gives the requests different cached prefixes (request 3 has none).
    cached = {0: 17, 1: 24, 2: 5}
    runner.step({r: seqs[r][:n] for r, n in cached.items()})
    # One step mixing a prefill chunk (0), a decode (1), a chunk (2) and a fresh prompt (3).
    step = {r: seqs[r][cached.get(r, 0) :] for r in seqs}
    out = runner.step(step, all_logits=True)
    for r, s in seqs.items():
        _close(out[r], hf_logits(hf, s)[cached.get(r, 0) :])


def test_rms_norm_matches_hf_in_bf16() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(5, 64, dtype=torch.bfloat16) * 3
    ref = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.normal_()
        assert torch.equal(rms_norm_torch(x, ref.weight, 1e-5), ref(x))


def test_rope_preserves_norm_and_relative_positions() -> None:
    from radixrt.models.layers import RotaryEmbedding

    rope = RotaryEmbedding(16, 64, 10000.0, None, device="cpu")
    q = torch.randn(1, 2, 16).expand(2, 2, 16)
    k = torch.randn(1, 1, 16).expand(2, 1, 16)
    qr, kr = apply_rope_torch(q, k, torch.tensor([3, 10]), rope.cos_sin_cache)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    # Scores depend only on the distance: (q@3, k@3) == (q@10, k@10).
    torch.testing.assert_close((qr[0] * kr[0]).sum(-1), (qr[1] * kr[1]).sum(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["llama3", "qwen3"])
def test_cuda_matches_cpu(tiny_model_dir: TinyModelDir, variant: str) -> None:
    directory = tiny_model_dir(variant)
    prompt = _prompt(5, 40)
    ref = PagedRunner(load_model(directory).model, page_size=16).step({0: prompt}, all_logits=True)
    gpu = load_model(directory, device="cuda").model
    out = PagedRunner(gpu, page_size=16).step({0: prompt[:23]}, all_logits=True)[0]
    _close(out.cpu(), ref[0][:23])
