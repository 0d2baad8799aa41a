"""apply_rope (neox / rotate-half) vs the torch formula, including strided and partial-rotary
inputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from radixrt.kernels.rope import apply_rope  # noqa: E402


def cos_sin_cache(max_pos: int, rot_dim: int, theta: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]  # [max_pos, R/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, R]


def rope_reference(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    half = cache.shape[1] // 2
    cos = cache[positions, :half][:, None, :]  # [T, 1, R/2]
    sin = cache[positions, half:][:, None, :]
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
    return out.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_fraction", [1.0, 0.5])
def test_apply_rope(device, assert_close, dtype, rot_fraction):
    tokens, heads, kv_heads, head_dim = (300, 32, 8, 128) if device == "cuda" else (9, 4, 2, 32)
    rot = int(head_dim * rot_fraction)
    cache = cos_sin_cache(4096, rot).to(device)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    # q and k as strided views of one fused projection output, as the model produces them.
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device=device).to(dtype)
    q, k = qkv[:, :heads], qkv[:, heads : heads + kv_heads]
    v_before = qkv[:, heads + kv_heads :].clone()
    q_ref, k_ref = rope_reference(q, positions, cache), rope_reference(k, positions, cache)
    q_out, k_out = apply_rope(q, k, positions, cache)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)
    assert torch.equal(qkv[:, heads + kv_heads :], v_before), "rope wrote outside q and k"
