"""Decode attention (one query token per request) over the paged pool, split along the KV length.

Flash-decoding in two launches:

    stage 1  grid (B, Hkv, num_splits): program (b, g, s) reads KV positions
             [s * split_len, min((s+1) * split_len, seq_len_b)) of KV head g ONCE and scores all
             GROUP query heads of that group against it (a [BLOCK_H, D] x [D, BLOCK_N] dot,
             query heads padded to 16 rows). Writes a normalised partial output and its
             log-sum-exp (base 2) per query head.
    stage 2  grid (B, Hq): merges the non-empty splits with LSE weights. A one-split step
             skips it: stage 1 writes the normalised output itself (DIRECT_OUT).

    seq_len_b = 10, num_splits = 4, BLOCK_N = 2, MIN_SPLIT_LEN = 4
    split_len = max(round_up(cdiv(10, 4), BLOCK_N), MIN_SPLIT_LEN) = 4
    positions  0 1 2 3 | 4 5 6 7 | 8 9 | (empty)
    split      0       | 1       | 2   | 3 -> skipped in both stages

The split length is computed on the device from seq_lens, and num_splits and stage 1's tile
(``decode_plan``) are host ints fixed per batch size and context class, so one launch shape
serves every step of a captured CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixrt.kernels.decode_plan import DecodeLaunch, decode_block_n
from radixrt.kernels.extend_attention import LOG2E, mma
from radixrt.kernels.paged_inputs import check_rows, dot_precision, interpreting


@triton.jit
def _split_range(
    seq_len, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT_LEN: tl.constexpr
):
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    split_len = tl.maximum(split_len, MIN_SPLIT_LEN)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    return start, end


@triton.jit
def split_range_from(
    kv_start, seq_len, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
):
    """``_split_range`` of the KV range [kv_start, seq_len) (a cascade request's own suffix)."""
    start, end = _split_range(seq_len - kv_start, split, NUM_SPLITS, BLOCK_N, MIN_SPLIT_LEN)
    return kv_start + start, kv_start + end


@triton.jit
def tile_slots(page_row, start_n, bound, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Flat pool slots of KV positions start_n .. start_n + BLOCK_N - 1 (start_n a multiple of
    min(PAGE_SIZE, BLOCK_N)); table reads at positions >= bound are masked off (slot of page 0,
    never loaded by the callers, whose K/V loads mask the same positions)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if PAGE_SIZE >= BLOCK_N:  # the tile lies inside one page: one table read
        page = tl.load(page_row + start_n // PAGE_SIZE, mask=start_n < bound, other=0)
        slots = page.to(tl.int64) * PAGE_SIZE + (offs_n % PAGE_SIZE)
    elif PAGE_SIZE >= 16:  # one table read per page of the tile, not one per position
        idx = start_n // PAGE_SIZE + tl.arange(0, BLOCK_N // PAGE_SIZE)
        pages = tl.load(page_row + idx, mask=idx * PAGE_SIZE < bound, other=0)
        in_page = tl.arange(0, PAGE_SIZE)
        slots = tl.reshape(pages.to(tl.int64)[:, None] * PAGE_SIZE + in_page[None, :], [BLOCK_N])
    else:
        page = tl.load(page_row + offs_n // PAGE_SIZE, mask=offs_n < bound, other=0)
        slots = page.to(tl.int64) * PAGE_SIZE + (offs_n % PAGE_SIZE)
    return slots


# One compiled variant for every page-table width (the engine's table, tests' one-off ones).
@triton.jit(do_not_specialize=["stride_pt"])
def _decode_stage1_kernel(
    Q,  # [B, Hq, D]
    K,  # [S, Hkv, D] flat pool layer
    V,  # [S, Hkv, D]
    PartO,  # [B, Hq, NUM_SPLITS, D] fp32
    PartLse,  # [B, Hq, NUM_SPLITS] fp32, base-2 log-sum-exp
    seq_lens,  # [B] int32
    page_table,  # [R, max_pages] int32, the device page table
    req_rows,  # [B] int32, each request's row of page_table
    kv_starts,  # [B] int32 first KV position to attend (read only when HAS_KV_START)
    Out,  # [B, Hq, D] final output (written instead of the partials when DIRECT_OUT)
    qk_scale,
    stride_ob,
    stride_oh,
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_pt,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    HAS_KV_START: tl.constexpr = False,
    DIRECT_OUT: tl.constexpr = False,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + req)
    if HAS_KV_START:
        kv_start = tl.load(kv_starts + req)
        start, end = split_range_from(kv_start, seq_len, split, NUM_SPLITS, BLOCK_N, MIN_SPLIT_LEN)
    else:
        start, end = _split_range(seq_len, split, NUM_SPLITS, BLOCK_N, MIN_SPLIT_LEN)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h
    out_ptrs = Out + req.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if start >= end:
        if DIRECT_OUT:  # a padded request (seq_len 0, e.g. in a captured graph): zeros, not NaN
            zeros = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32).to(Out.dtype.element_ty)
            tl.store(out_ptrs, zeros, mask=mask_h[:, None] & mask_d[None, :])
        return
    page_row = page_table + tl.load(req_rows + req).to(tl.int64) * stride_pt
    q = tl.load(
        Q + req.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_D]

    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    # Each tile's slots are read one iteration ahead: K/V addresses loaded in the same iteration
    # pipeline one tile deep whatever num_stages, loop-carried ones num_stages - 1 deep.
    slots = tile_slots(page_row, start, end, PAGE_SIZE, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        next_slots = tile_slots(page_row, start_n + BLOCK_N, end, PAGE_SIZE, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            V + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        qk = mma(q, tl.trans(k.to(q.dtype)), PRECISION, INTERPRET) * qk_scale  # [BLOCK_H, BLOCK_N]
        # Every tile has >= 1 valid key (start_n < end), so m_new is finite for all rows.
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(q.dtype), v.to(q.dtype), PRECISION, INTERPRET)
        m_i = m_new
        slots = next_slots

    if DIRECT_OUT:  # one split: its normalised partial is the answer (what stage 2 would write)
        tl.store(out_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty),
                 mask=mask_h[:, None] & mask_d[None, :])
        return
    # PartO/PartLse are contiguous: [B, Hq, NUM_SPLITS, (D)].
    row = (req.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split
    tl.store(
        PartO + row[:, None] * HEAD_DIM + offs_d[None, :],
        acc / l_i[:, None],
        mask=mask_h[:, None] & mask_d[None, :],
    )
    tl.store(PartLse + row, m_i + tl.log2(l_i), mask=mask_h)


@triton.jit
def _decode_stage2_kernel(
    PartO,  # [B, Hq, NUM_SPLITS, D] fp32
    PartLse,  # [B, Hq, NUM_SPLITS] fp32
    Out,  # [B, Hq, D]
    seq_lens,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens + req)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    start, end = _split_range(seq_len, offs_s, NUM_SPLITS, BLOCK_N, MIN_SPLIT_LEN)
    # Stage 1 skipped empty splits and left their buffer rows stale: never read them.
    valid = (offs_s < NUM_SPLITS) & (start < end)
    row = (req.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS + offs_s
    lse = tl.load(PartLse + row, mask=valid, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = tl.where(valid, weight, 0.0)
    part = tl.load(
        PartO + row[:, None] * HEAD_DIM + offs_d[None, :],
        mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    # Padded requests (seq_len 0, e.g. in a captured graph) have no split: write zeros, not NaN.
    out = tl.sum(part * weight[:, None], 0) / tl.maximum(tl.sum(weight, 0), 1e-30)
    tl.store(
        Out + req.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
        out.to(Out.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_flat: torch.Tensor,  # [S, Hkv, D] pool layer, already holding this step's K
    v_flat: torch.Tensor,  # [S, Hkv, D]
    seq_lens: torch.Tensor,  # [B] int32
    page_table: torch.Tensor,  # [R, max_pages] int32
    req_rows: torch.Tensor,  # [B] int32, each request's row of page_table
    page_size: int,
    scale: float,
    num_splits: int,
    part_out: torch.Tensor,  # >= B * Hq * num_splits * D fp32 elements, contiguous
    part_lse: torch.Tensor,  # >= B * Hq * num_splits fp32 elements, contiguous
    out: torch.Tensor | None = None,  # [B, Hq, D]
    min_split_len: int = 256,
    direct_single_split: bool = True,
    launch: DecodeLaunch | None = None,  # stage 1's tile (None: decode_partials' default)
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of one new query per request over its whole KV (no host syncs, no allocation
    beyond ``out`` when it is not given). With one split, stage 1 writes ``out`` itself and the
    merge launch is skipped (same bits: a one-split merge multiplies by 1 and divides by 1) unless
    ``direct_single_split`` is False."""
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1, "out must be [B, Hq, D], D contiguous"
    if q.shape[0] == 0:
        return out
    direct = num_splits == 1 and direct_single_split
    block_n, min_split_len = decode_partials(
        q, k_flat, v_flat, seq_lens, page_table, req_rows, page_size, scale, num_splits,
        part_out, part_lse, min_split_len=min_split_len, direct_out=out if direct else None,
        block_n=launch.block_n if launch else None, num_warps=launch.num_warps if launch else None,
        num_stages=launch.num_stages if launch else None,
    )  # fmt: skip
    if direct:
        return out  # stage 1 wrote the output: a one-split merge would copy it unchanged
    batch, num_heads, head_dim = q.shape
    _decode_stage2_kernel[(batch, num_heads)](
        part_out, part_lse, out, seq_lens, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=block_n,
        NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
        MIN_SPLIT_LEN=min_split_len, num_warps=4 if q.device.type == "cuda" else 1,
    )  # fmt: skip
    return out


def decode_partials(
    q: torch.Tensor,  # [B, Hq, D]
    k_flat: torch.Tensor,  # [S, Hkv, D]
    v_flat: torch.Tensor,  # [S, Hkv, D]
    seq_lens: torch.Tensor,  # [B] int32
    page_table: torch.Tensor,  # [R, max_pages] int32
    req_rows: torch.Tensor,  # [B] int32
    page_size: int,
    scale: float,
    num_splits: int,
    part_out: torch.Tensor,  # >= B * Hq * num_splits * D fp32, viewed as [B, Hq, splits, D]
    part_lse: torch.Tensor,  # >= B * Hq * num_splits fp32 (base-2 log-sum-exp)
    *,
    min_split_len: int = 256,
    kv_starts: torch.Tensor | None = None,  # [B] int32: attend [kv_starts[b], seq_lens[b]) only
    block_n: int | None = None,  # launch settings (None: the per-request decode's own)
    num_warps: int | None = None,
    num_stages: int | None = None,
    direct_out: torch.Tensor | None = None,  # [B, Hq, D]: one split only; written, not partials
) -> tuple[int, int]:
    """Stage 1 alone: each request's normalised split partials and their LSE. Returns the
    (BLOCK_N, rounded min split length) a reader of the partials needs to know which splits are
    non-empty (``split_range_from``)."""
    assert q.dim() == 3 and k_flat.dim() == 3, "q is [B, Hq, D]; k/v are flat pool [S, Hkv, D]"
    assert q.shape[2] == k_flat.shape[2] and k_flat.shape == v_flat.shape, "shape mismatch"
    assert q.shape[1] % k_flat.shape[1] == 0, "query heads must be a multiple of KV heads"
    assert page_size >= 1 and page_size & (page_size - 1) == 0, f"page_size {page_size} not 2^k"
    assert q.stride(2) == 1 and k_flat.stride(2) == 1 and v_flat.stride(2) == 1, (
        "the head_dim axis must be contiguous"
    )
    assert num_splits >= 1, "need at least one KV split"
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    group = num_heads // num_kv_heads
    assert part_out.dtype == part_lse.dtype == torch.float32, "partials are fp32"
    assert part_out.is_contiguous() and part_lse.is_contiguous(), "partial buffers contiguous"
    assert part_out.numel() >= batch * num_heads * num_splits * head_dim, "part_out too small"
    assert part_lse.numel() >= batch * num_heads * num_splits, "part_lse too small"
    check_rows(page_table, req_rows, seq_lens)
    assert kv_starts is None or kv_starts.shape == seq_lens.shape, "one KV start per request"
    assert direct_out is None or (num_splits == 1 and direct_out.shape == q.shape
                                  and direct_out.stride(2) == 1), "direct_out: one split, [B, Hq, D]"
    block_n = block_n or decode_block_n(q.device)
    min_split_len = triton.cdiv(max(min_split_len, block_n), block_n) * block_n
    if batch == 0:
        return block_n, min_split_len
    on_gpu = q.device.type == "cuda"
    _decode_stage1_kernel[(batch, num_kv_heads, num_splits)](
        q, k_flat, v_flat, part_out, part_lse, seq_lens, page_table, req_rows,
        kv_starts if kv_starts is not None else seq_lens,
        direct_out if direct_out is not None else q, scale * LOG2E,
        direct_out.stride(0) if direct_out is not None else 0,
        direct_out.stride(1) if direct_out is not None else 0,
        q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1),
        v_flat.stride(0), v_flat.stride(1), page_table.stride(0),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PAGE_SIZE=page_size, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, MIN_SPLIT_LEN=min_split_len, PRECISION=dot_precision(q.dtype),
        INTERPRET=interpreting(), HAS_KV_START=kv_starts is not None,
        DIRECT_OUT=direct_out is not None,
        num_warps=(num_warps or 4) if on_gpu else 1, num_stages=(num_stages or 3) if on_gpu else 1,
    )  # fmt: skip
    return block_n, min_split_len
