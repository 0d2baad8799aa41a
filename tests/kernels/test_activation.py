"""silu_and_mul vs torch: silu(first half) * second half."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from radixrt.kernels.activation import silu_and_mul  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_silu_and_mul(device, assert_close, dtype):
    shapes = [(7, 14336), (130, 3000)] if device == "cuda" else [(5, 48), (3, 1100)]
    for tokens, inter in shapes:
        x = (torch.randn(tokens, 2 * inter, device=device) * 4).to(dtype)
        out = silu_and_mul(x)
        gate, up = x.float().chunk(2, dim=-1)
        ref = (torch.nn.functional.silu(gate) * up).to(dtype)
        assert out.shape == (tokens, inter) and out.dtype == dtype, "[T, I] in the input dtype"
        assert_close(out, ref)
