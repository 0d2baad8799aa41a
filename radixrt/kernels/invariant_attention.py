"""Batch-invariant paged attention: one kernel for prefill chunks and decode steps, whose output
for a query depends only on that query and its request's KV, never on how the step was formed.

Deterministic inference runs every attention call through it. The fast kernels are not
invariant: ``decode_attention`` splits the KV into a number of pieces chosen from the batch
size, and ``extend_attention`` takes a mask-free path for keys below its query tile, so the
same (query, key block) pair goes through different code depending on where the cached prefix
ended; a token decoded inside a mixed batch goes through yet another kernel than one decoded in
a pure decode step. Here every query row does the same arithmetic wherever it is computed:

    tile rows   (BLOCK_M = TOKENS x GROUP_P, the GQA group packed as in decode)
                row r -> token t0 + r // GROUP_P, query head kv_head * GROUP + r % GROUP_P
    keys        blocks [0, BN), [BN, 2BN), ... aligned to absolute position 0, every block
                masked, one pass (no KV split): online softmax in the same block order

A block past a row's own position is fully masked for that row: p = 0 and its running max does
not move (alpha = exp2(0) = 1), so the block adds exact zeros, and how many such blocks the
row's tile visits cannot change the row's result.

Grid: (token tiles of the longest request, KV heads, requests); token tiles of one (request, KV
head) run next to each other, so their shared K/V blocks are read from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixrt.kernels.extend_attention import (
    LOG2E,
    _attend_block,
    _check_paged_inputs,
    dot_precision,
    interpreting,
)


# The page-table width changes step to step: one compiled variant for every width.
@triton.jit(do_not_specialize=["stride_pt"])
def _invariant_attention_kernel(
    Q,  # [T, Hq, D]
    K,  # [S, Hkv, D] flat pool layer
    V,  # [S, Hkv, D]
    Out,  # [T, Hq, D]
    qo_indptr,  # [B+1] int32
    prefix_lens,  # [B] int32
    page_table,  # [B, max_pages] int32
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
    GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    TOKENS: tl.constexpr = BLOCK_M // GROUP_P
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.program_id(2)
    q_start = tl.load(qo_indptr + req)
    extend = tl.load(qo_indptr + req + 1) - q_start
    t0 = tile * TOKENS
    if t0 >= extend:  # this request is shorter than the longest one
        return
    prefix = tl.load(prefix_lens + req)
    page_row = page_table + req.to(tl.int64) * stride_pt

    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    tok = t0 + offs_r // GROUP_P  # [BLOCK_M] token offset within the request's new tokens
    in_group = offs_r % GROUP_P
    mask_r = (tok < extend) & (in_group < GROUP)
    head = kv_head * GROUP + in_group
    row = (q_start + tok).to(tl.int64)
    q = tl.load(
        Q + row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=mask_r[:, None] & mask_d[None, :],
        other=0.0,
    )
    q_pos = prefix + tok  # every row, padding included, sees key 0: no row ends fully masked
    kv_end = tl.minimum(prefix + extend, prefix + t0 + TOKENS)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, K, V, page_row, start_n, kv_end, q_pos, kv_head,
            stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, offs_d, mask_d,
            PAGE_SIZE, BLOCK_N, True, PRECISION, INTERPRET,
        )  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(
        Out + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask_r[:, None] & mask_d[None, :],
    )


def invariant_tile(group: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): a function of the model alone."""
    group_p = triton.next_power_of_2(group)
    if device.type != "cuda":
        return max(16, group_p), 16, 1, 1
    # 16 rows: a decode step (one token per request) wastes little MMA work; prefill tiles of
    # 16 / GROUP tokens re-read K/V, mostly from L2.
    return max(16, group_p), 64, 4, 2


def invariant_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_flat: torch.Tensor,  # [S, Hkv, D] pool layer, already holding this step's K
    v_flat: torch.Tensor,  # [S, Hkv, D]
    qo_indptr: torch.Tensor,  # [B+1] int32
    prefix_lens: torch.Tensor,  # [B] int32
    page_table: torch.Tensor,  # [B, max_pages] int32
    page_size: int,
    max_extend_len: int,
    scale: float,
    out: torch.Tensor | None = None,  # [T, Hq, D]
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each request's new queries (1 for decode) over its whole KV."""
    _check_paged_inputs(q, k_flat, v_flat, page_size)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1, "out must be [T, Hq, D], D contiguous"
    batch = page_table.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    assert page_table.stride(1) == 1, "page_table rows must be contiguous"
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    block_m, block_n, num_warps, num_stages = invariant_tile(group, q.device)
    grid = (triton.cdiv(max_extend_len, block_m // group_p), num_kv_heads, batch)
    _invariant_attention_kernel[grid](
        q, k_flat, v_flat, out, qo_indptr, prefix_lens, page_table, scale * LOG2E,
        q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1),
        v_flat.stride(0), v_flat.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
        INTERPRET=interpreting(), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
