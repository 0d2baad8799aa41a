"""RMSNorm and fused residual-add + RMSNorm, one program per row, matching Hugging Face's
rounding: normalise in fp32, cast to the input dtype, then multiply by the weight.

    fused_add_rms_norm:  s = x + residual  (rounded to x.dtype, as HF adds in the model dtype)
                         normed = rms_norm(s),  new_residual = s
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    X,  # [T, H]
    R,  # [T, H] residual (read only when HAS_RESIDUAL)
    W,  # [H]
    Out,  # [T, H]
    ResOut,  # [T, H] x + residual (written only when HAS_RESIDUAL)
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(ResOut + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / HIDDEN
    normed = (xf * tl.rsqrt(var + eps)).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (normed * w).to(Out.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [T, H] with unit last stride
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    assert weight.shape == (hidden,), f"weight {tuple(weight.shape)} != ({hidden},)"
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    r2 = res_out = None
    if residual is not None:
        assert residual.shape == x.shape, "residual and x shapes differ"
        r2 = _rows(residual)
        res_out = torch.empty_like(out)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2 if r2 is not None else x2, weight.contiguous(), out,
            res_out if res_out is not None else out,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, out.stride(0),
            res_out.stride(0) if res_out is not None else 0, eps,
            HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 512)) if x.device.type == "cuda" else 1,
        )  # fmt: skip
    return out.view(x.shape), (res_out.view(x.shape) if res_out is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H], weight: [H] -> [..., H] in x.dtype."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); inputs are left untouched."""
    normed, new_residual = _launch(x, residual, weight, eps)
    assert new_residual is not None, "residual path always writes new_residual"
    return normed, new_residual
