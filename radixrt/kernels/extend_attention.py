"""Extend (prefill) attention over the paged KV pool, ragged over requests, in one launch.

Request ``b`` owns new queries ``qo_indptr[b] .. qo_indptr[b+1]`` (``E_b`` of them) whose K/V are
already stored in the pool; query ``j`` sits at absolute position ``prefix_b + j`` and attends to
KV positions ``0 .. prefix_b + j``, all read through row ``req_rows[b]`` of the page table::

    KV positions   0 ............ prefix_b ...... prefix_b + E_b
                   [ cached prefix ][ new tokens (causal) ]
    query block    positions m0 .. m0+P-1, each with the G packed query heads of one KV head
                   |<---- unmasked ---->|<- causal ->|
                   0              prefix_b + m0   prefix_b + m0 + P

A tile of ``BLOCK_M`` rows holds ``P = BLOCK_M / G`` positions times ``G`` query heads sharing a
KV head (GQA packing), so every K/V tile is loaded once for all of them. Keys below
``prefix_b + m0`` are visible to every row, so those tiles run without masks; only the trailing
``P`` keys (the diagonal) need the causal mask. With split-KV, the unmasked tiles of a block are
shared among ``splits`` programs whose partial results merge by log-sum-exp.

Grid: (query blocks of the longest request, requests, head groups x splits). Online softmax in
fp32, base 2 (the scale folds in log2(e)). Tile shapes: ``extend_configs``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixrt.kernels import extend_configs
from radixrt.kernels.extend_configs import (
    ExtendConfig,
    choose_kv_splits,
    default_config,
    sm_count,
)
from radixrt.kernels.extend_dense import dense_new_part, use_dense_new
from radixrt.kernels.extend_runs import ExtendReuse
from radixrt.kernels.extend_split import merge_splits
from radixrt.kernels.paged_inputs import check_paged_inputs, check_rows, dot_precision, interpreting

LOG2E = 1.4426950408889634


@triton.jit
def mma(a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """tl.dot(a, b) in fp32 accumulation; operands are already rounded to their input dtype."""
    if INTERPRET:
        # The CPU interpreter mis-multiplies 16-bit floats (seen with triton 3.9), and its dot is
        # numpy's BLAS, whose rounding can depend on a row's place in the tile: widen (exact)
        # and sum the products in one fixed order, so results stay batch-invariant on the CPU.
        out = tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
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


@triton.jit
def mma_acc(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b in fp32; on the GPU the MMA accumulates in place (no separate add)."""
    if INTERPRET:
        out = acc + mma(a, b, PRECISION, INTERPRET)  # the same fixed-order CPU product
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _tile_slots(
    page_row, start_n, bound, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_VEC: tl.constexpr,
):  # fmt: skip
    """Flat pool slots of keys start_n .. start_n + BLOCK_N - 1 (start_n a multiple of BLOCK_N);
    table reads for keys >= bound are masked off (slot 0..: never loaded by the caller)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if PAGE_SIZE >= BLOCK_N:
        # The tile lies inside one page: one table read, contiguous slots.
        page = tl.load(page_row + start_n // PAGE_SIZE, mask=start_n < bound, other=0)
        slots = page.to(tl.int64) * PAGE_SIZE + (offs_n % PAGE_SIZE)
    elif PAGE_VEC and PAGE_SIZE >= 16:
        # One table read per page of the tile instead of one per key.
        idx = start_n // PAGE_SIZE + tl.arange(0, BLOCK_N // PAGE_SIZE)
        pages = tl.load(page_row + idx, mask=idx * PAGE_SIZE < bound, other=0)
        in_page = tl.arange(0, PAGE_SIZE)
        slots = tl.reshape(pages.to(tl.int64)[:, None] * PAGE_SIZE + in_page[None, :], [BLOCK_N])
    else:
        page = tl.load(page_row + offs_n // PAGE_SIZE, mask=offs_n < bound, other=0)
        slots = page.to(tl.int64) * PAGE_SIZE + (offs_n % PAGE_SIZE)
    return slots


@triton.jit
def _load_kv(base, slots, stride_t, offs_n, kv_end, offs_d, mask_d, EVEN_D: tl.constexpr,
             MASKED: tl.constexpr):
    ptrs = base + slots[:, None] * stride_t + offs_d[None, :]
    if MASKED:
        tile = tl.load(ptrs, mask=(offs_n < kv_end)[:, None] & mask_d[None, :], other=0.0)
    elif EVEN_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=mask_d[None, :], other=0.0)
    return tile


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, K, V, slots, start_n, kv_end, q_pos, stride_kt, stride_vt, qk_scale,
    offs_d, mask_d, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One K/V tile (at ``slots``) into the online softmax; K and V already point at the tile's
    KV head. MASKED tiles apply the causal mask (callers guarantee every valid row sees >= 1
    key)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_kv(K, slots, stride_kt, offs_n, kv_end, offs_d, mask_d, EVEN_D, MASKED)
    qk = mma(q, tl.trans(k.to(q.dtype)), PRECISION, INTERPRET)
    if MASKED:
        s = tl.where(offs_n[None, :] <= q_pos[:, None], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:  # the scale folds into one multiply-add with the max subtraction
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv(V, slots, stride_vt, offs_n, kv_end, offs_d, mask_d, EVEN_D, MASKED)
    acc = mma_acc(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], PRECISION, INTERPRET)
    return acc, m_new, l_i


# One compiled variant for every page-table width, token count and split count.
@triton.jit(do_not_specialize=["stride_pt", "num_tokens", "num_splits"])
def _extend_kernel(
    Q,  # [T, Hq, D]
    K,  # [S, Hkv, D] flat pool layer
    V,  # [S, Hkv, D]
    Out,  # [T, Hq, D]
    PartO,  # [splits, T, Hq, HEAD_DIM] fp32 (SPLIT only)
    PartLse,  # [splits, T, Hq] fp32, base-2 log-sum-exp (SPLIT only)
    qo_indptr, prefix_lens, page_table, req_rows,  # as in extend_attention
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_pt, num_tokens, num_splits,
    GROUP: tl.constexpr, HEADS_PER_TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DIAG_N: tl.constexpr, PAGE_VEC: tl.constexpr, SPLIT: tl.constexpr, PREFIX_ONLY: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    # Launch the longest-running (last, most keys) query blocks first for better load balance.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    req = tl.program_id(1)
    head_group = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    POSITIONS: tl.constexpr = BLOCK_M // HEADS_PER_TILE
    kv_head = (head_group * HEADS_PER_TILE) // GROUP

    q_start = tl.load(qo_indptr + req)
    extend = tl.load(qo_indptr + req + 1) - q_start
    m_start = m_block * POSITIONS
    if m_start >= extend:  # this request is shorter than the longest one
        return
    prefix = tl.load(prefix_lens + req)
    page_row = page_table + tl.load(req_rows + req).to(tl.int64) * stride_pt

    # Row r of the tile: position m_start + r // HEADS_PER_TILE, head r % HEADS_PER_TILE of the
    # group (head-minor, so one position's heads are adjacent in Q and Out).
    offs_r = tl.arange(0, BLOCK_M)
    pos = m_start + offs_r // HEADS_PER_TILE
    head = head_group * HEADS_PER_TILE + offs_r % HEADS_PER_TILE
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = pos < extend
    mask_d = offs_d < HEAD_DIM
    tok = (q_start + pos).to(tl.int64)
    q = tl.load(
        Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    q_pos = prefix + pos
    K += kv_head * stride_kh
    V += kv_head * stride_vh

    # Every row sees keys < full_end: whole tiles below it run unmasked; only the last few tiles
    # (the block's own POSITIONS keys, the diagonal) need the causal mask.
    full_end = prefix + m_start
    kv_end = tl.minimum(prefix + extend, full_end + POSITIONS)
    if PREFIX_ONLY:  # the cached prefix alone (new x new runs elsewhere): no causal keys
        full_end = prefix
        kv_end = prefix
        q_pos = tl.zeros_like(q_pos) + prefix - 1  # the tail tile's mask then stops at kv_end
    n_full = (full_end // BLOCK_N) * BLOCK_N
    lo = 0
    hi = n_full
    masked_lo = n_full
    if SPLIT:  # split s takes its share of the unmasked tiles; the last also takes the diagonal
        tiles = n_full // BLOCK_N
        per = tl.cdiv(tiles, num_splits)
        lo = tl.minimum(split * per, tiles) * BLOCK_N
        hi = tl.minimum(split * per + per, tiles) * BLOCK_N
        masked_lo = tl.where(split == num_splits - 1, n_full, kv_end)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    # Each tile's slots are read from the page table one iteration ahead: K/V addresses that
    # come from a load in the same iteration pipeline only one tile deep (num_stages ignored),
    # a loop-carried one num_stages - 1 deep.
    slots = _tile_slots(page_row, lo, hi, PAGE_SIZE, BLOCK_N, PAGE_VEC)
    for start_n in range(lo, hi, BLOCK_N):
        next_slots = _tile_slots(page_row, start_n + BLOCK_N, hi, PAGE_SIZE, BLOCK_N, PAGE_VEC)
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, K, V, slots, start_n, kv_end, q_pos, stride_kt, stride_vt,
            qk_scale, offs_d, mask_d, BLOCK_N, EVEN_D, False, PRECISION, INTERPRET,
        )  # fmt: skip
        slots = next_slots
    # Key n_full <= full_end <= every row's position, so no valid row is fully masked (no NaN).
    # The masked keys span < BLOCK_N + POSITIONS: tiles of ~POSITIONS keys there waste less of
    # the MMA on keys past the diagonal than BLOCK_N-wide ones.
    slots_d = _tile_slots(page_row, masked_lo, kv_end, PAGE_SIZE, DIAG_N, PAGE_VEC)
    for start_n in range(masked_lo, kv_end, DIAG_N):
        next_d = _tile_slots(page_row, start_n + DIAG_N, kv_end, PAGE_SIZE, DIAG_N, PAGE_VEC)
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, K, V, slots_d, start_n, kv_end, q_pos, stride_kt, stride_vt,
            qk_scale, offs_d, mask_d, DIAG_N, EVEN_D, True, PRECISION, INTERPRET,
        )  # fmt: skip
        slots_d = next_d

    io_mask = mask_m[:, None] & mask_d[None, :]
    if SPLIT:  # an empty split (no tiles) leaves l = 0: it writes lse -inf and weighs nothing
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        row = (split * num_tokens + tok) * (tl.num_programs(2) // num_splits * HEADS_PER_TILE) + head
        tl.store(PartO + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
                 mask=io_mask)
        tl.store(PartLse + row, tl.where(empty, float("-inf"), m_i + tl.log2(l_safe)), mask=mask_m)
    else:
        out = acc / l_i[:, None]
        tl.store(
            Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=io_mask,
        )


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
    config: ExtendConfig | None = None,  # default: the table's entry for this shape and GPU
    *,
    max_seq_len: int | None = None,  # longest prefix + extend; enables split-KV when known
    num_kv_splits: int | None = None,  # force a split count (default: choose_kv_splits)
    dense_new: bool | None = None,  # new x new on torch's SDPA (default: use_dense_new)
    k_new: torch.Tensor | None = None,  # [T, Hkv, D] this step's K (also stored in the pool):
    v_new: torch.Tensor | None = None,  # new x new reads them densely (extend_newkv.py)
    reuse: ExtendReuse | None = None,  # metadata shared by a step's layers (extend_runs.py)
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each request's new queries over its cached prefix plus itself."""
    check_paged_inputs(q, k_flat, v_flat, page_size)
    num_tokens, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1, "out must be [T, Hq, D], D contiguous"
    batch = req_rows.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    check_rows(page_table, req_rows, prefix_lens)
    group = num_heads // k_flat.shape[1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    cfg = config or default_config(block_d, group, q.device, q.element_size(), max_extend_len)
    assert group % cfg.heads_per_tile == 0, f"{cfg} packs more heads than the group of {group}"
    head_groups = num_heads // cfg.heads_per_tile
    m_blocks = triton.cdiv(max_extend_len, cfg.block_m // cfg.heads_per_tile)
    splits = num_kv_splits or choose_kv_splits(
        m_blocks * batch * head_groups, max_seq_len, num_tokens, num_heads, head_dim,
        sm_count(q.device),
    )  # fmt: skip
    assert splits >= 1 and head_groups * splits < 65536, f"bad split count {splits}"
    dense = use_dense_new(q, max_extend_len) if dense_new is None else dense_new
    # Dense: partial 0 is new x new from SDPA, partials 1.. the prefix splits; else only splits.
    parts = splits + 1 if dense else splits
    part_o = part_lse = out  # unused unless split
    if parts > 1:
        part_o = torch.empty(parts, num_tokens, num_heads, head_dim, dtype=torch.float32,
                             device=q.device)
        part_lse = torch.empty(parts, num_tokens, num_heads, dtype=torch.float32, device=q.device)
    if dense:
        dense_new_part(q, k_flat, v_flat, qo_indptr, prefix_lens, page_table, req_rows, page_size,
                       scale, part_o[0], part_lse[0])
    prefix_o, prefix_lse = (part_o[1:], part_lse[1:]) if dense else (part_o, part_lse)
    grid = (m_blocks, batch, head_groups * splits)
    from radixrt.kernels import extend_newkv  # imports this module's tile helpers

    if (not dense and extend_configs.USE_NEW_KV
            and extend_newkv.new_kv_usable(k_new, v_new, k_flat, num_tokens)):
        assert k_new is not None and v_new is not None
        extend_newkv.launch_newkv(
            q, k_flat, v_flat, k_new, v_new, out, prefix_o, prefix_lse, qo_indptr, prefix_lens,
            page_table, req_rows, page_size, scale * LOG2E, grid, splits, group, block_d, cfg,
            dot_precision(q.dtype), interpreting(), reuse,
        )  # fmt: skip
    else:
        _extend_kernel[grid](
            q, k_flat, v_flat, out, prefix_o, prefix_lse, qo_indptr, prefix_lens, page_table,
            req_rows, scale * LOG2E, q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1),
            v_flat.stride(0), v_flat.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
            num_tokens, splits,
            GROUP=group, HEADS_PER_TILE=cfg.heads_per_tile, HEAD_DIM=head_dim, BLOCK_D=block_d,
            PAGE_SIZE=page_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DIAG_N=cfg.diag_n,
            PAGE_VEC=cfg.page_vec, SPLIT=parts > 1, PREFIX_ONLY=dense,
            PRECISION=dot_precision(q.dtype), INTERPRET=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    if parts > 1:
        merge_splits(part_o, part_lse, out)
    return out


def extend_flops(
    extend_lens: list[int], prefix_lens: list[int], num_heads: int, head_dim: int
) -> float:
    """Useful FLOPs (QK^T and PV, causal) of one extend_attention call, for throughput reports."""
    pairs = sum(e * p + e * (e + 1) / 2 for e, p in zip(extend_lens, prefix_lens))
    return 4.0 * num_heads * head_dim * pairs
