"""Shared-prefix (cascade) decode attention: a prefix several running requests share is read
once per group per step instead of once per request.

    group g: requests b0 b1 b2 share KV positions [0, L_g) (the same physical pages)

    pass 1  items (one KV chunk of one tile) x KV heads: a tile packs up to TILE_REQS requests
            of one group x the GROUP query heads of one KV head into BLOCK_M rows, so each
            shared K/V tile is loaded once and scored by every row ([BLOCK_M, D] x [D, BLOCK_N]):

                rows   b0.h0 b0.h1 b0.h2 b0.h3 | b1.h0 ... | b2.h3 | padding
                item   KV [start, end) of the group's prefix, read through row ``rep`` of the
                       page table (any member's row: the prefix pages are the same)

            writes a normalised partial output + base-2 LSE per row, item-major:
            PreO[item, kv_head, row, D]. Groups of few members get small tiles (SMALL_M rows) in
            the same launch, so their tensor-core work is not mostly padding.
    pass 2  each request's own suffix [kv_starts[b], seq_len_b) by the split-KV decode stage 1
            (``decode_partials``); ungrouped requests have kv_start 0 and no items.
    merge   grid (B, Hkv): the suffix splits and the request's prefix items combined by LSE, for
            the GROUP query heads of a KV head at once.

Every launch shape depends on host ints fixed per batch size (splits, programs), and pass 1
loops over ``num_items`` read on the device, so a captured CUDA graph replays any grouping whose
metadata fits the buffers (``attention/cascade_plan.py`` builds it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixrt.kernels.cascade_meta import CascadeMeta, PrefixTiling
from radixrt.kernels.decode_attention import decode_partials, split_range_from, tile_slots
from radixrt.kernels.decode_plan import decode_block_n
from radixrt.kernels.extend_attention import LOG2E, mma
from radixrt.kernels.paged_inputs import dot_precision, interpreting

# KV tiles on CUDA, from the CUDA-graph-timed H200 sweep (bench/cascade_sweep.py, RESULTS.md
# session 5): pass 1 at 32 and 64 within noise (run 2's eager sweep favoured 32, a launch-overhead
# artefact); the own-suffix pass at 32 beats the per-request decode's 64 by 1.5% at 64x4 (its
# loops are 2-6 tiles long). The per-request decode keeps its own settings.
PREFIX_BLOCK_N_CUDA = 64
SUFFIX_BLOCK_N_CUDA = 32


@triton.jit
def _prefix_item(
    item, Q, K, V, PreO, PreLse, items, members, page_table, qk_scale, kv_head, num_kv_heads,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_pt,
    GROUP: tl.constexpr, ROWS: tl.constexpr, ROW_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One item: KV [start, end) of a tile's shared prefix against the tile's ROWS rows."""
    offs_m = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    member = offs_m // GROUP
    heads = kv_head * GROUP + offs_m % GROUP
    meta = items + item * 5
    page_row = page_table + tl.load(meta).to(tl.int64) * stride_pt
    kv_start = tl.load(meta + 1)
    kv_end = tl.load(meta + 2)
    first = tl.load(meta + 3)
    count = tl.load(meta + 4)
    valid_m = member < count
    req = tl.load(members + first + member, mask=valid_m, other=0).to(tl.int64)
    q = tl.load(
        Q + req[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=valid_m[:, None] & mask_d[None, :],
        other=0.0,
    )  # [ROWS, BLOCK_D]: every member's query heads of this KV head
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    # Slots one tile ahead (loop-carried: the K/V loads pipeline num_stages - 1 deep).
    slots = tile_slots(page_row, kv_start, kv_end, PAGE_SIZE, BLOCK_N)
    for start_n in range(kv_start, kv_end, BLOCK_N):
        next_slots = tile_slots(page_row, start_n + BLOCK_N, kv_end, PAGE_SIZE, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        qk = mma(q, tl.trans(k.to(q.dtype)), PRECISION, INTERPRET) * qk_scale
        # Each tile holds >= 1 valid key, so m_new is finite for every row (padding too).
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(q.dtype), v.to(q.dtype), PRECISION, INTERPRET)
        m_i = m_new
        slots = next_slots
    # Partial rows keep the big tile's stride whatever the item's class (the merge's layout).
    row = ((item * num_kv_heads + kv_head) * ROW_STRIDE + offs_m).to(tl.int64)
    tl.store(PreO + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None],
             mask=valid_m[:, None] & mask_d[None, :])
    tl.store(PreLse + row, m_i + tl.log2(l_i), mask=valid_m)


# One compiled variant for every page-table width.
@triton.jit(do_not_specialize=["stride_pt"])
def _shared_prefix_kernel(
    Q,  # [B, Hq, D]
    K,  # [S, Hkv, D]
    V,  # [S, Hkv, D]
    PreO,  # [item_cap, Hkv, BLOCK_M, D] fp32
    PreLse,  # [item_cap, Hkv, BLOCK_M] fp32, base 2
    items,  # [item_cap, 5] int32: small-tile items first, then big-tile items
    num_items_ptr,  # [2] int32: all items, small-tile items (listed first)
    members,  # [M] int32
    page_table,  # [R, max_pages] int32
    qk_scale, stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_pt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, SMALL_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    kv_head = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    programs = tl.num_programs(0)
    pid = tl.program_id(0)
    num_items = tl.load(num_items_ptr)
    num_small = tl.load(num_items_ptr + 1)
    # Persistent over items: the grid is fixed (a graph replays it) while the item count varies.
    # Item j goes to program j % programs across both classes, so the classes share the load.
    if SMALL_M < BLOCK_M:  # tiles of few members: SMALL_M rows, not BLOCK_M mostly padding
        for item in range(pid, num_small, programs):
            _prefix_item(item, Q, K, V, PreO, PreLse, items, members, page_table, qk_scale,
                         kv_head, num_kv_heads, stride_qb, stride_qh, stride_kt, stride_kh,
                         stride_vt, stride_vh, stride_pt, GROUP, SMALL_M, BLOCK_M, HEAD_DIM,
                         BLOCK_D, PAGE_SIZE, BLOCK_N, PRECISION, INTERPRET)
    big0 = pid + tl.maximum(0, tl.cdiv(num_small - pid, programs)) * programs
    for item in range(big0, num_items, programs):
        _prefix_item(item, Q, K, V, PreO, PreLse, items, members, page_table, qk_scale,
                     kv_head, num_kv_heads, stride_qb, stride_qh, stride_kt, stride_kh,
                     stride_vt, stride_vh, stride_pt, GROUP, BLOCK_M, BLOCK_M, HEAD_DIM,
                     BLOCK_D, PAGE_SIZE, BLOCK_N, PRECISION, INTERPRET)


@triton.jit
def _split_nonempty(kv_start, seq_len, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                    MIN_SPLIT_LEN: tl.constexpr):
    """Whether decode_partials wrote suffix split ``split`` (a vector: one per row)."""
    start, end = split_range_from(kv_start, seq_len, split, NUM_SPLITS, BLOCK_N, MIN_SPLIT_LEN)
    return start < end


@triton.jit
def _merge_part(acc, wsum, m, part, lse):
    """Add a normalised part with base-2 LSE ``lse`` (-inf: absent) to the running merge."""
    m_new = tl.maximum(m, lse)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing yet: no inf - inf
    alpha = tl.exp2(m - m_ref)
    w = tl.exp2(lse - m_ref)
    return acc * alpha[:, None] + part * w[:, None], wsum * alpha + w, m_new


@triton.jit
def _cascade_merge_kernel(
    SufO,  # [B, Hq, NUM_SPLITS, D] fp32 (decode_partials)
    SufLse,  # [B, Hq, NUM_SPLITS]
    PreO,  # [item_cap, Hkv, BLOCK_M, D] fp32
    PreLse,  # [item_cap, Hkv, BLOCK_M]
    Out,  # [B, Hq, D]
    seq_lens, kv_starts, first_item, item_count, slot, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
):
    # Grid (B, Hkv): one program merges the GROUP query heads of a KV head (a quarter of the
    # programs of one per query head at GQA 4: the merge is latency-bound, not bandwidth-bound).
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h
    seq_len = tl.load(seq_lens + req)
    kv_start = tl.load(kv_starts + req)
    first = tl.load(first_item + req)
    count = tl.load(item_count + req)
    row_h = tl.load(slot + req) * GROUP + offs_h  # the request's rows in its tile
    suf_row = (req.to(tl.int64) * (GROUP * num_kv_heads) + heads) * NUM_SPLITS
    # One pass, online: each part (the suffix splits decode_partials wrote, then the tile's
    # prefix items) rescales the running sum to the new largest LSE, so each part's LSE and
    # output are loaded together once. Empty splits left stale rows: never read them.
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_H], dtype=tl.float32)
    io = mask_h[:, None] & mask_d[None, :]
    for s in tl.static_range(NUM_SPLITS):
        valid = mask_h & _split_nonempty(kv_start, seq_len, offs_h * 0 + s, NUM_SPLITS, BLOCK_N,
                                         MIN_SPLIT_LEN)
        lse = tl.load(SufLse + suf_row + s, mask=valid, other=float("-inf"))
        part = tl.load(SufO + (suf_row + s)[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=valid[:, None] & mask_d[None, :], other=0.0)
        acc, wsum, m = _merge_part(acc, wsum, m, part, lse)
    for i in range(0, count):
        pre_row = ((first + i).to(tl.int64) * num_kv_heads + kv_head) * BLOCK_M + row_h
        lse = tl.load(PreLse + pre_row, mask=mask_h, other=float("-inf"))
        part = tl.load(PreO + pre_row[:, None] * HEAD_DIM + offs_d[None, :], mask=io, other=0.0)
        acc, wsum, m = _merge_part(acc, wsum, m, part, lse)
    # Rows with no part at all (padded rows of a graph) end with wsum 0: zeros, not NaN.
    out = acc / tl.maximum(wsum, 1e-30)[:, None]
    tl.store(Out + req.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=io)


def prefix_partial_rows(item_cap: int, num_kv_heads: int, tiling: PrefixTiling) -> int:
    """Rows of the pass-1 partial buffers (times head_dim for PreO)."""
    return item_cap * num_kv_heads * tiling.block_m


@dataclass(frozen=True)
class CascadeLaunch:
    """Launch settings of the three kernels (None: the defaults below; benchmarks sweep them)."""

    prefix_block_n: int | None = None
    prefix_warps: int | None = None
    prefix_stages: int | None = None
    suffix_block_n: int | None = None  # None: the per-request decode kernel's settings
    suffix_warps: int | None = None
    suffix_stages: int | None = None


def shared_prefix_pass(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, page_table: torch.Tensor,
    page_size: int, scale: float, meta: CascadeMeta, tiling: PrefixTiling, *,
    prefix_programs: int, pre_out: torch.Tensor, pre_lse: torch.Tensor,
    launch: CascadeLaunch = CascadeLaunch(),
) -> None:
    """Pass 1 alone: every item's normalised partial + LSE into ``pre_out`` / ``pre_lse``."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    group = num_heads // num_kv_heads
    assert tiling.tile_reqs * group <= tiling.block_m, "a tile's rows exceed block_m"
    assert tiling.small_reqs * group <= tiling.small_m, "a small tile's rows exceed small_m"
    rows = prefix_partial_rows(meta.items.shape[0], num_kv_heads, tiling)
    assert pre_out.dtype == pre_lse.dtype == torch.float32, "partials are fp32"
    assert pre_out.numel() >= rows * head_dim and pre_lse.numel() >= rows, "prefix partials small"
    assert prefix_programs >= 1, "pass 1 needs at least one program per KV head"
    assert meta.num_items.shape[0] >= 2, "num_items holds (all items, small-tile items)"
    on_gpu = q.device.type == "cuda"
    warps = launch.prefix_warps or ((4 if tiling.block_m <= 64 else 8) if on_gpu else 1)
    _shared_prefix_kernel[(prefix_programs, num_kv_heads)](
        q, k_flat, v_flat, pre_out, pre_lse, meta.items, meta.num_items, meta.members,
        page_table, scale * LOG2E, q.stride(0), q.stride(1), k_flat.stride(0),
        k_flat.stride(1), v_flat.stride(0), v_flat.stride(1), page_table.stride(0),
        GROUP=group, BLOCK_M=tiling.block_m, SMALL_M=tiling.small_m, HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PAGE_SIZE=page_size,
        BLOCK_N=launch.prefix_block_n or (PREFIX_BLOCK_N_CUDA if on_gpu else decode_block_n(q.device)),
        PRECISION=dot_precision(q.dtype), INTERPRET=interpreting(), num_warps=warps if on_gpu else 1,
        num_stages=(launch.prefix_stages or 3) if on_gpu else 1,
    )  # fmt: skip


def cascade_merge(
    suf_out: torch.Tensor, suf_lse: torch.Tensor, pre_out: torch.Tensor, pre_lse: torch.Tensor,
    out: torch.Tensor, seq_lens: torch.Tensor, meta: CascadeMeta, tiling: PrefixTiling, *,
    num_kv_heads: int, num_splits: int, suffix_block_n: int, min_split_len: int,
) -> None:
    """The LSE merge of each request's suffix splits and its tile's prefix items into ``out``."""
    batch, num_heads, head_dim = out.shape
    group = num_heads // num_kv_heads
    _cascade_merge_kernel[(batch, num_kv_heads)](
        suf_out, suf_lse, pre_out, pre_lse, out, seq_lens, meta.kv_starts, meta.first_item,
        meta.item_count, meta.slot, out.stride(0), out.stride(1),
        GROUP=group, BLOCK_H=max(2, triton.next_power_of_2(group)), BLOCK_M=tiling.block_m,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=suffix_block_n, NUM_SPLITS=num_splits, MIN_SPLIT_LEN=min_split_len,
        num_warps=4 if out.device.type == "cuda" else 1,
    )  # fmt: skip


def cascade_decode(
    q: torch.Tensor,  # [B, Hq, D]
    k_flat: torch.Tensor,  # [S, Hkv, D] pool layer, already holding this step's K
    v_flat: torch.Tensor,  # [S, Hkv, D]
    seq_lens: torch.Tensor,  # [B] int32
    page_table: torch.Tensor,  # [R, max_pages] int32
    req_rows: torch.Tensor,  # [B] int32
    page_size: int,
    scale: float,
    meta: CascadeMeta,
    tiling: PrefixTiling,
    *,
    num_splits: int,  # suffix splits per request
    prefix_programs: int,  # pass-1 programs per KV head (they loop over the items)
    suf_out: torch.Tensor,  # >= B * Hq * num_splits * D fp32
    suf_lse: torch.Tensor,  # >= B * Hq * num_splits fp32
    pre_out: torch.Tensor,  # >= prefix_partial_rows(...) * D fp32
    pre_lse: torch.Tensor,  # >= prefix_partial_rows(...) fp32
    out: torch.Tensor | None = None,
    min_split_len: int = 256,
    block_n: int | None = None,  # pass 1's (tests); ``launch`` holds the rest
    launch: CascadeLaunch = CascadeLaunch(),
    side_stream: torch.cuda.Stream | None = None,
) -> torch.Tensor:  # [B, Hq, D]
    """Decode attention with shared prefixes read once per tile (no host syncs).

    ``side_stream`` (CUDA): pass 1 runs there, beside pass 2 on the current stream (fork and
    join, so a CUDA graph captures two parallel branches): pass 1's few long programs and pass
    2's many short ones fill each other's tails instead of leaving SMs idle."""
    batch = q.shape[0]
    num_kv_heads = k_flat.shape[1]
    assert meta.kv_starts.shape[0] == batch, "cascade metadata is for another batch size"
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1, "out must be [B, Hq, D], D contiguous"
    if batch == 0:
        return out
    if block_n is not None:
        launch = dataclasses.replace(launch, prefix_block_n=block_n)
    on_gpu = q.device.type == "cuda"
    main = torch.cuda.current_stream(q.device) if on_gpu and side_stream is not None else None
    if main is not None:
        assert side_stream is not None
        side_stream.wait_stream(main)  # fork: q and this step's K/V are written
    with torch.cuda.stream(side_stream) if main is not None else contextlib.nullcontext():
        shared_prefix_pass(q, k_flat, v_flat, page_table, page_size, scale, meta, tiling,
                           prefix_programs=prefix_programs, pre_out=pre_out, pre_lse=pre_lse,
                           launch=launch)
    bn_suffix, min_split_len = decode_partials(
        q, k_flat, v_flat, seq_lens, page_table, req_rows, page_size, scale, num_splits,
        suf_out, suf_lse, min_split_len=min_split_len, kv_starts=meta.kv_starts,
        block_n=launch.suffix_block_n or (SUFFIX_BLOCK_N_CUDA if on_gpu else None),
        num_warps=launch.suffix_warps,
        num_stages=launch.suffix_stages,
    )  # fmt: skip
    if main is not None:
        assert side_stream is not None
        main.wait_stream(side_stream)  # join: the merge reads pass 1's partials
    cascade_merge(suf_out, suf_lse, pre_out, pre_lse, out, seq_lens, meta, tiling,
                  num_kv_heads=num_kv_heads, num_splits=num_splits, suffix_block_n=bn_suffix,
                  min_split_len=min_split_len)
    return out
