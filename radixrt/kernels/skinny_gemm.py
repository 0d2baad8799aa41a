"""Skinny linear layer for decode batches: ``y = x W^T`` with few rows (M <= 256), where the
weight read is the whole cost and cuBLAS leaves most SMs idle.

At M = 16-64 a Llama-3-8B projection is a weight stream (qkv: 50 MB), yet cuBLAS runs it at
1.7-2.4x the time to read it (bench/RESULTS.md, session 7): its tiles cover N with few programs
(o_proj: 4096 / 128 = 32 tiles for 132 SMs). Here each program owns BLOCK_N weight rows and one
of SPLIT_K slices of K, so N / BLOCK_N x SPLIT_K programs stream the weight at once::

    W [N, K]   ┌──────┬──────┬──────┬──────┐   program (n, s): rows n*BN .. n*BN+BN-1,
               │ n,0  │ n,1  │ n,2  │ n,3  │   columns s*K/S .. (s+1)*K/S - 1
               └──────┴──────┴──────┴──────┘
    partial[s] = W[n rows, slice s] @ x[:, slice s]^T     (fp32, [S, M, N] workspace)
    y = sum over s of partial[s]                          (second kernel, fixed order)

The weight tile is the MMA's M side (BLOCK_N >= 64 rows) and the batch its N side, so a batch
of 16 wastes nothing. The split sum runs in a fixed order (no atomics): results are
deterministic run to run, though not batch-invariant (deterministic inference keeps
kernels/matmul.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixrt.kernels.extend_attention import mma_acc
from radixrt.kernels.paged_inputs import dot_precision, interpreting


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(
    X,  # [M, K]
    W,  # [N, K]
    P,  # [SPLIT_K, M, N] fp32 partials, or Y [M, N] when SPLIT_K == 1
    M,
    N,
    K_SLICE,  # K / SPLIT_K, a multiple of BLOCK_K
    stride_xm,
    stride_wn,
    stride_ps,
    stride_pm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    k0 = pid_s * K_SLICE
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + (k0 + offs_k)[None, :]  # [BN, BK]
    # x^T read directly ([BK, BM], K along rows): x is small and L2-resident, and the loaded
    # tile is the MMA's B side as is (no transpose in registers).
    x_ptrs = X + offs_m[None, :].to(tl.int64) * stride_xm + (k0 + offs_k)[:, None]  # [BK, BM]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(0, K_SLICE, BLOCK_K):
        w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        x = tl.load(x_ptrs, mask=mask_m[None, :], other=0.0)
        acc = mma_acc(w, x, acc, PRECISION, INTERPRET)  # the interpreter's 16-bit dot is wrong
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    p_ptrs = P + pid_s * stride_ps + offs_m[None, :].to(tl.int64) * stride_pm + offs_n[:, None]
    tl.store(p_ptrs, acc.to(P.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _sum_splits_kernel(
    P,  # [SPLIT_K, M * N] fp32
    Y,  # [M * N]
    TOTAL,  # M * N
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    acc = tl.load(P + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(P + s * TOTAL + offs, mask=mask, other=0.0)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


def fits(m: int, n: int, k: int, cfg: SkinnyConfig) -> bool:
    """Whether ``cfg`` covers an [m, k] x [n, k]^T product without K masking."""
    return 1 <= m <= 256 and k % (cfg.split_k * cfg.block_k) == 0 and n >= 1


def skinny_linear(
    x: torch.Tensor,  # [M, K], M <= 256, unit stride along K
    weight: torch.Tensor,  # [N, K] contiguous
    config: SkinnyConfig,
) -> torch.Tensor:  # [M, N] in x.dtype
    """``F.linear(x, weight)`` for few rows (no bias: Llama-family projections have none)."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and x.dtype == weight.dtype, "x and weight disagree"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "K must be the contiguous axis"
    assert fits(m, n, k, config), f"config {config} does not cover M={m} N={n} K={k}"
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = max(16, triton.next_power_of_2(m))
    split = config.split_k
    part = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, config.block_n), split)
    _skinny_kernel[grid](
        x, weight, part, m, n, k // split, x.stride(0), weight.stride(0),
        part.stride(0) if split > 1 else 0, n,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        PRECISION=dot_precision(x.dtype), INTERPRET=interpreting(), num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](part, y, m * n, SPLIT_K=split, BLOCK=block)
    return y
