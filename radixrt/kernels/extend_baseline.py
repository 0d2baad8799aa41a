"""The extend attention kernel before issue 18 (one query head per program, 64x64 tiles), kept
as the baseline ``bench/bench_prefill.py`` measures the current kernel against."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixrt.kernels.extend_attention import LOG2E, _attend_block
from radixrt.kernels.paged_inputs import check_paged_inputs, check_rows, dot_precision, interpreting


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


def extend_attention_baseline(
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
    """The previous kernel (one query head per program), same contract as extend_attention."""
    check_paged_inputs(q, k_flat, v_flat, page_size)
    num_tokens, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1, "out must be [T, Hq, D], D contiguous"
    batch = req_rows.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    check_rows(page_table, req_rows, prefix_lens)
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
