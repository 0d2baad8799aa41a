"""Extend (prefill) attention over the paged KV pool, ragged over requests, in one launch.

Request ``b`` owns new queries ``qo_indptr[b] .. qo_indptr[b+1]`` (``E_b`` of them) whose K/V are
already stored in the pool; query ``j`` sits at absolute position ``prefix_b + j`` and attends to
KV positions ``0 .. prefix_b + j``, all read through row ``req_rows[b]`` of the page table::

    KV positions   0 ............ prefix_b ...... prefix_b + E_b
                   [ cached prefix ][ new tokens (causal) ]
    query block    rows m0 .. m0+BM-1  (positions prefix_b + m0 ..)
                   |<---- unmasked ---->|<- causal ->|
                   0              prefix_b + m0   prefix_b + m0 + BM

Keys below ``prefix_b + m0`` are visible to every row of the block, so that part runs without
masks; only the trailing ``BLOCK_M`` keys (the block's own diagonal) need the causal mask.

Grid: (query blocks of the longest request, requests, query heads). Online softmax in fp32,
base 2 (the scale folds in log2(e)).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def mma(a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """tl.dot(a, b) in fp32 accumulation; operands are already rounded to their input dtype."""
    if INTERPRET:
        # The CPU interpreter mis-multiplies 16-bit floats (seen with triton 3.9): widen first,
        # which is exact since the values are already representable.
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _paged_slots(page_row, offs_n, mask_n, PAGE_SIZE: tl.constexpr):
    # Flat pool slot of each KV position: page_table[b, pos // P] * P + pos % P (P a power of 2).
    page = tl.load(page_row + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
    return page * PAGE_SIZE + (offs_n % PAGE_SIZE)


@triton.jit
def _attend_block(
    q,  # [BLOCK_M, BLOCK_D] query tile (input dtype)
    acc,  # [BLOCK_M, BLOCK_D] fp32
    m_i,  # [BLOCK_M] fp32 running max (base-2 logits)
    l_i,  # [BLOCK_M] fp32 running denominator
    K,
    V,
    page_row,
    start_n,
    kv_end,
    q_pos,  # [BLOCK_M] absolute positions of the queries
    kv_head,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    qk_scale,
    offs_d,
    mask_d,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    GUARD_EMPTY: tl.constexpr,  # rows may have seen no visible key yet (m_i = -inf)
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        mask_n = offs_n < kv_end
    else:
        mask_n = offs_n >= 0  # all true: the caller guarantees offs_n < kv_end
    slots = _paged_slots(page_row, offs_n, mask_n, PAGE_SIZE)
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(
        K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    qk = mma(q, tl.trans(k.to(q.dtype)), PRECISION, INTERPRET) * qk_scale  # [BM, BN]
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_ref = m_new
    if GUARD_EMPTY:  # exponentiate an all-masked row against 0, not -inf: p, alpha = 0, no NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(qk - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        V + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    acc = acc * alpha[:, None] + mma(p.to(q.dtype), v.to(q.dtype), PRECISION, INTERPRET)
    return acc, m_new, l_i


# One compiled variant for every page-table width (the engine's table, tests' one-off ones).
@triton.jit(do_not_specialize=["stride_pt"])
def _extend_attention_kernel(
    Q,  # [T, Hq, D]
    K,  # [S, Hkv, D] flat pool layer
    V,  # [S, Hkv, D]
    Out,  # [T, Hq, D]
    qo_indptr,  # [B+1] int32
    prefix_lens,  # [B] int32
    page_table,  # [R, max_pages] int32, the device page table
    req_rows,  # [B] int32, each request's row of page_table
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_pt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Launch the longest-running (last, most keys) query blocks first for better load balance.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    req = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(qo_indptr + req)
    extend = tl.load(qo_indptr + req + 1) - q_start
    m_start = m_block * BLOCK_M
    if m_start >= extend:  # this request is shorter than the longest one
        return
    prefix = tl.load(prefix_lens + req)
    page_row = page_table + tl.load(req_rows + req).to(tl.int64) * stride_pt

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < extend
    mask_d = offs_d < HEAD_DIM
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        Q + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    q_pos = prefix + offs_m

    # Every row of the block sees keys < full_end; whole BLOCK_N tiles below it need no mask.
    full_end = prefix + m_start
    n_full = (full_end // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(prefix + extend, full_end + BLOCK_M)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, K, V, page_row, start_n, kv_end, q_pos, kv_head,
            stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, offs_d, mask_d,
            PAGE_SIZE, BLOCK_N, False, PRECISION, INTERPRET, False,
        )  # fmt: skip
    # Key n_full <= full_end <= every row's position, so no row is fully masked here (no NaN).
    for start_n in range(n_full, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, K, V, page_row, start_n, kv_end, q_pos, kv_head,
            stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, offs_d, mask_d,
            PAGE_SIZE, BLOCK_N, True, PRECISION, INTERPRET, False,
        )  # fmt: skip

    out = acc / l_i[:, None]
    tl.store(
        Out + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def _block_sizes(head_dim_block: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the launch."""
    if device.type != "cuda":
        return 16, 16, 4, 1  # interpreter: small tiles keep numpy work per program low
    if head_dim_block <= 64:
        return 128, 64, 4, 3
    # head_dim 128 on an H100, 8 x 1024 causal prefill (bench_kernels.py --sweep-extend):
    # 64x64 / 4 warps / 4 stages 0.277 ms vs 0.308 ms for the former 128x64 / 8 warps.
    return 64, 64, 4, 4


def _check_paged_inputs(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, page_size: int
) -> None:
    assert q.dim() == 3 and k_flat.dim() == 3, "q is [T, Hq, D]; k/v are flat pool [S, Hkv, D]"
    assert q.shape[2] == k_flat.shape[2] == v_flat.shape[2], "head_dim mismatch between q and pool"
    assert k_flat.shape == v_flat.shape, "K and V pool tensors differ in shape"
    assert q.shape[1] % k_flat.shape[1] == 0, "query heads must be a multiple of KV heads"
    assert page_size >= 1 and page_size & (page_size - 1) == 0, f"page_size {page_size} not 2^k"
    assert q.stride(2) == 1 and k_flat.stride(2) == 1 and v_flat.stride(2) == 1, (
        "the head_dim axis must be contiguous"
    )


def _check_rows(page_table: torch.Tensor, req_rows: torch.Tensor, per_request: torch.Tensor) -> None:
    assert page_table.dim() == 2 and page_table.stride(1) == 1, "page_table rows must be contiguous"
    assert req_rows.dim() == 1 and req_rows.shape == per_request.shape, "one table row per request"


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 (~3e-4 error); keep them exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def extend_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_flat: torch.Tensor,  # [S, Hkv, D] pool layer, already holding this step's K
    v_flat: torch.Tensor,  # [S, Hkv, D]
    qo_indptr: torch.Tensor,  # [B+1] int32
    prefix_lens: torch.Tensor,  # [B] int32
    page_table: torch.Tensor,  # [R, max_pages] int32
    req_rows: torch.Tensor,  # [B] int32, each request's row of page_table
    page_size: int,
    max_extend_len: int,
    scale: float,
    out: torch.Tensor | None = None,  # [T, Hq, D]
    config: tuple[int, int, int, int] | None = None,  # (BLOCK_M, BLOCK_N, warps, stages)
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each request's new queries over its cached prefix plus itself."""
    _check_paged_inputs(q, k_flat, v_flat, page_size)
    num_tokens, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1, "out must be [T, Hq, D], D contiguous"
    batch = req_rows.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    _check_rows(page_table, req_rows, prefix_lens)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = config or _block_sizes(block_d, q.device)
    grid = (triton.cdiv(max_extend_len, block_m), batch, num_heads)
    _extend_attention_kernel[grid](
        q, k_flat, v_flat, out, qo_indptr, prefix_lens, page_table, req_rows, scale * LOG2E,
        q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1),
        v_flat.stride(0), v_flat.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        GROUP=num_heads // k_flat.shape[1], HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=dot_precision(q.dtype), INTERPRET=interpreting(), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def extend_flops(
    extend_lens: list[int], prefix_lens: list[int], num_heads: int, head_dim: int
) -> float:
    """Useful FLOPs (QK^T and PV, causal) of one extend_attention call, for throughput reports."""
    pairs = sum(e * p + e * (e + 1) / 2 for e, p in zip(extend_lens, prefix_lens))
    return 4.0 * num_heads * head_dim * pairs
