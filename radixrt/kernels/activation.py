"""SwiGLU's gate: silu(gate) * up over x = [gate | up], fp32 math, one rounding at the end.
Per token row:

    x[t] : [ gate (I) | up (I) ]  ->  out[t] : [I] = silu(gate) * up
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    X,  # [T, 2I]
    Out,  # [T, I]
    stride_x,
    stride_o,
    INTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(Out + row * stride_o + offs, out.to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] -> [T, I] in x.dtype."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0, f"need [T, 2I], got {tuple(x.shape)}"
    if x.stride(1) != 1:
        x = x.contiguous()
    tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((tokens, inter), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(tokens, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), INTER=inter, BLOCK=block,
        num_warps=4 if x.device.type == "cuda" else 1,
    )  # fmt: skip
    return out
