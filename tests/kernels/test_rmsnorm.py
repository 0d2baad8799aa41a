"""rms_norm / fused_add_rms_norm vs Hugging Face's formula (fp32 statistics, cast, then weight)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from radixrt.kernels.rmsnorm import fused_add_rms_norm, rms_norm  # noqa: E402


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _hidden(device: str) -> list[int]:
    return [96, 4096, 5120] if device == "cuda" else [48, 64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm(device, assert_close, dtype):
    for hidden in _hidden(device):
        x = torch.randn(37, hidden, device=device).to(dtype) * 3
        weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
        out = rms_norm(x, weight, 1e-6)
        assert out.dtype == dtype and out.shape == x.shape, "rms_norm keeps shape and dtype"
        assert_close(out, hf_rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_3d_per_head(device, assert_close, dtype):
    """QK-norm style use: normalise each head's [D] slice of a strided [T, H, D] view."""
    qkv = torch.randn(5, 3, 6, 32, device=device).to(dtype)
    q = qkv[:, 0]  # [5, 6, 32], not contiguous
    weight = torch.randn(32, device=device).to(dtype)
    assert_close(rms_norm(q, weight, 1e-5), hf_rms_norm(q, weight, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm(device, assert_close, dtype):
    for hidden in _hidden(device):
        x = torch.randn(23, hidden, device=device).to(dtype)
        residual = torch.randn(23, hidden, device=device).to(dtype)
        x_before, r_before = x.clone(), residual.clone()
        weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
        normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
        expected_residual = x + residual  # HF adds in the model dtype
        if device == "cpu" and dtype == torch.bfloat16:
            # The CPU interpreter truncates fp32 -> bf16 (compiled Triton rounds to nearest).
            torch.testing.assert_close(new_residual, expected_residual, rtol=2**-7, atol=0)
        else:
            assert torch.equal(new_residual, expected_residual), "new_residual != x + residual"
        assert_close(normed, hf_rms_norm(expected_residual, weight, 1e-6))
        assert torch.equal(x, x_before) and torch.equal(residual, r_before), "inputs modified"
