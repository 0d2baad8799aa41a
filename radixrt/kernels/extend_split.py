"""Split-KV merge for extend attention: each split wrote its normalized partial output and its
base-2 log-sum-exp; the result weighs every split by its share of the softmax mass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def _merge_splits_kernel(
    PartO, PartLse, Out, stride_ot, stride_oh, num_tokens, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Out[t, h] = the splits' partial outputs weighted by their share of the softmax mass."""
    tok = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < NUM_HEADS
    mask = mask_h[:, None] & (offs_d < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for s in range(num_splits):
        row = (s * num_tokens + tok) * NUM_HEADS + offs_h
        lse = tl.load(PartLse + row, mask=mask_h, other=float("-inf"))
        o = tl.load(PartO + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, lse)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split seen yet: no NaN
        alpha = tl.exp2(m - m_ref)
        w = tl.exp2(lse - m_ref)
        acc = acc * alpha[:, None] + o * w[:, None]
        l_sum = l_sum * alpha + w
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(Out + tok * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask)


def merge_splits(
    part_o: torch.Tensor,  # [splits, T, Hq, D] fp32
    part_lse: torch.Tensor,  # [splits, T, Hq] fp32
    out: torch.Tensor,  # [T, Hq, D]
) -> None:
    splits, num_tokens, num_heads, head_dim = part_o.shape
    assert part_o.is_contiguous() and part_lse.is_contiguous(), "partials must be contiguous"
    assert part_lse.shape == part_o.shape[:3] and out.shape == part_o.shape[1:], "shape mismatch"
    block_h = min(triton.next_power_of_2(num_heads), 8)
    _merge_splits_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        part_o, part_lse, out, out.stride(0), out.stride(1), num_tokens, splits,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_H=block_h,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )  # fmt: skip
