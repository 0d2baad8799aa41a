"""Batch-invariant linear layer: ``y = x W^T (+ b)`` whose row ``i`` is bitwise the same whatever
the number of rows ``M`` in the call.

cuBLAS picks its kernel (tile shape, split-K) from the problem size, so the same token's
projection rounds differently in a decode batch of 7 and one of 200, or in a 900-token prefill
and a 37-token suffix prefill after a cache hit. Greedy decoding on near-flat distributions then
flips tokens. Here the launch configuration depends on ``(N, K)`` only (fixed per weight), never
on ``M``, and there is no split-K: every output element is the same fp32 chain

    acc = 0;  for k0 in 0, BK, 2BK, ...:  acc += x[i, k0:k0+BK] . W[j, k0:k0+BK]

so a row's result cannot depend on which other rows share the launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixrt.kernels.paged_inputs import dot_precision, interpreting


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def gemm_config(n: int, dtype: torch.dtype, device: torch.device) -> GemmConfig:
    """The one configuration for a weight with ``n`` output features: a function of the weight
    alone, never of the number of rows."""
    if device.type != "cuda":
        return GemmConfig(16, 16, 16, 1, 1)  # interpreter: small tiles, little numpy work
    if dtype.itemsize == 4:  # half the K tile, fewer stages: fits shared memory
        return GemmConfig(128, 64, 32, 4, 3)
    # Chosen on an H100 (bench/bench_invariant.py, Llama-3-8B weights) for M = 256 and 8192
    # alike, since the tile may not depend on M.
    if n >= 16384:  # wide weights (MLP up, vocab)
        return GemmConfig(128, 256, 64, 8, 3)
    return GemmConfig(128, 128, 64, 8, 4)


# M varies call to call: never specialize on it (no recompiles, one code path for every M).
@triton.jit(do_not_specialize=["M"])
def _linear_kernel(
    X,  # [M, K]
    W,  # [N, K]
    Bias,  # [N] (read only when HAS_BIAS)
    Y,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Grouped launch order: GROUP_M row tiles walk the column tiles together, so each weight
    # tile is read from DRAM about once while it sits in L2. Only the order changes, not the math.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if INTERPRET:
            # The CPU interpreter's dot is numpy's BLAS, whose rounding can depend on a row's
            # place in the tile (edge micro-kernels), so rows would change with the batch: sum
            # the products over K explicitly, in the same order for every row (16-bit inputs
            # widened first, exactly).
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def batch_invariant_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    config: GemmConfig | None = None,
) -> torch.Tensor:  # [..., N] in x.dtype
    """Drop-in for ``F.linear`` whose rows do not depend on the other rows of ``x``."""
    assert weight.dim() == 2 and x.shape[-1] == weight.shape[1], (
        f"x [..., {x.shape[-1]}] does not match weight {tuple(weight.shape)}"
    )
    assert x.dtype == weight.dtype, f"x is {x.dtype} but weight is {weight.dtype}"
    assert bias is None or bias.shape == (weight.shape[0],), "bias must be [N]"
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m > 0:
        cfg = config or gemm_config(n, x.dtype, x.device)
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        _linear_kernel[grid](
            x2, weight, bias if bias is not None else weight, y, m, n, k,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, PRECISION=dot_precision(x.dtype),
            INTERPRET=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return y.view(*x.shape[:-1], n)
