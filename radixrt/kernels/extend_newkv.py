"""Extend attention that reads the new tokens' K/V from the forward's own contiguous tensors.

The paged kernel (``extend_attention._extend_kernel``) reads every key through the page table:
a gather per 16-token page, whose addresses come from another load. Within one step the new
tokens' K/V also exist densely (``k_new`` / ``v_new``, [T, Hkv, D], the tensors the backend
just stored into the pool), so here only the cached prefix goes through the page table and
the causal new x new square reads rows ``q_start + j`` of those tensors: affine addresses, on
Hopper TMA tensor descriptors (``USE_TMA``), else plain pointer loads. A prompt with no cached
prefix (cold prefill, every first chunk) never touches the page table at all::

    keys      0 ...... n_pf .. prefix | 0 ........ n_new_full ... m_start + P   (new-token index)
              [paged, unmasked][tail] | [dense, unmasked][dense, causal diagonal]

With TMA, whole prefix tiles whose pages form one run of consecutive ids load as one box of
pool rows too (``extend_runs``; ``ExtendConfig.pool_tma``), the rest by gather. Same tiles as
the paged kernel (GQA-packed rows, ``ExtendConfig``), same split-KV (splits share the unmasked
prefix tiles; the last one also takes the prefix tail and the new part), same base-2 online
softmax; results equal the paged kernel's up to fp32 summation order. On an H200 (session 5
call 2) the dense new-token reads took 1x32k from 60% to 70% of the matmul rate.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from radixrt.kernels.extend_attention import _load_kv, _tile_slots, mma, mma_acc
from radixrt.kernels.extend_configs import ExtendConfig
from radixrt.kernels.extend_runs import ExtendReuse, row_descriptor


@triton.jit
def _exp2_fma(x):
    """2^x for x <= 0 on the FMA pipe: 2^floor(x) written into the exponent bits times a degree-4
    fit of 2^f on [0, 1) (relative error 6e-6), for the half of a tile that would otherwise
    queue behind the other half on the special-function unit (16 exp2 a clock per SM on Hopper,
    against 128 FMAs)."""
    x = tl.maximum(x, -126.0)  # -inf (masked) -> 2^-126, nothing next to a row's max of 1
    xi = tl.floor(x)
    f = x - xi
    p = 1.0 + f * (0.693043479 + f * (0.241249809 + f * (0.0523528271 + f * 0.0133415371)))
    bits = p.to(tl.int32, bitcast=True) + (xi.to(tl.int32) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp2_tile(x, EXP_FMA: tl.constexpr):
    """exp2 of a [M, N] tile; EXP_FMA: the odd columns on the FMA pipe (a column pair sits in
    one thread of the MMA layout, so the split and join move no data)."""
    if EXP_FMA:
        m: tl.constexpr = x.shape[0]
        n: tl.constexpr = x.shape[1]
        even, odd = tl.split(tl.reshape(x, [m, n // 2, 2]))
        out = tl.reshape(tl.join(tl.exp2(even), _exp2_fma(odd)), [m, n])
    else:
        out = tl.exp2(x)
    return out


@triton.jit
def _scores(q, k, m_i, l_i, qk_scale, offs_n, q_pos, kv_end, MASKED: tl.constexpr,
            PRECISION: tl.constexpr, INTERPRET: tl.constexpr, EXP_FMA: tl.constexpr = False):  # fmt: skip
    """Base-2 probabilities of one K tile against q, the row rescale and the new max / sum.
    MASKED tiles keep keys ``offs_n <= q_pos`` and ``offs_n < kv_end`` only (callers guarantee
    every valid row has seen a visible key by the end of its first tile)."""
    qk = mma(q, tl.trans(k.to(q.dtype)), PRECISION, INTERPRET)
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & (offs_n < kv_end)[None, :]
        s = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:  # the scale folds into one multiply-add with the max subtraction
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = _exp2_tile(qk * qk_scale - m_new[:, None], EXP_FMA)
    alpha = tl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _new_tile(desc, base, row0, stride_t, kv_col, rows_left, offs_d, mask_d,
              BLOCK: tl.constexpr, USE_TMA: tl.constexpr, EVEN_D: tl.constexpr,
              MASKED: tl.constexpr):  # fmt: skip
    """Rows row0 .. row0 + BLOCK - 1 of a new-token K or V tensor (one KV head). TMA tiles
    read past the request's end (the next request's rows, zeros past T): the causal mask drops
    them; pointer tiles zero rows >= rows_left when MASKED."""
    if USE_TMA:
        tile = desc.load([row0, kv_col])
    else:
        offs = tl.arange(0, BLOCK)
        ptrs = base + (row0 + offs).to(tl.int64)[:, None] * stride_t + offs_d[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=(offs < rows_left)[:, None] & mask_d[None, :], other=0.0)
        elif EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=mask_d[None, :], other=0.0)
    return tile


# One compiled variant for every page-table width, token count and split count.
@triton.jit(do_not_specialize=["stride_pt", "num_tokens", "num_splits"])
def _extend_newkv_kernel(
    Q, K, V, KN, VN,  # Q [T, Hq, D]; K/V the flat pool layer [S, Hkv, D]; KN/VN new [T, Hkv, D]
    KN_desc, VN_desc, KN_diag, VN_diag,  # TMA descriptors of KN/VN ([T, Hkv*D]; USE_TMA only)
    KP_desc, VP_desc, Tiles, Rows, RunTiles,  # pool TMA descriptors ([S, Hkv*D]); tile lists
    stride_list,  # of extend_runs.prefix_tile_lists (POOL_TMA only)
    Out, PartO, PartLse,  # as in extend_attention._extend_kernel
    qo_indptr, prefix_lens, page_table, req_rows, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_knt, stride_knh,
    stride_vnt, stride_vnh, stride_ot, stride_oh, stride_pt, num_tokens, num_splits,
    GROUP: tl.constexpr, HEADS_PER_TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DIAG_N: tl.constexpr, PAGE_VEC: tl.constexpr, SPLIT: tl.constexpr, USE_TMA: tl.constexpr,
    POOL_TMA: tl.constexpr, EXP_FMA: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)  # longest-running blocks first
    req = tl.program_id(1)
    head_group = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    POSITIONS: tl.constexpr = BLOCK_M // HEADS_PER_TILE
    kv_head = (head_group * HEADS_PER_TILE) // GROUP

    q_start = tl.load(qo_indptr + req)
    extend = tl.load(qo_indptr + req + 1) - q_start
    m_start = m_block * POSITIONS
    if m_start >= extend:
        return
    prefix = tl.load(prefix_lens + req)
    page_row = page_table + tl.load(req_rows + req).to(tl.int64) * stride_pt

    # Row r: position m_start + r // HEADS_PER_TILE, query head r % HEADS_PER_TILE of the group.
    offs_r = tl.arange(0, BLOCK_M)
    pos = m_start + offs_r // HEADS_PER_TILE  # index among the request's new tokens
    head = head_group * HEADS_PER_TILE + offs_r % HEADS_PER_TILE
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = pos < extend
    mask_d = offs_d < HEAD_DIM
    tok = (q_start + pos).to(tl.int64)
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    K += kv_head * stride_kh
    V += kv_head * stride_vh
    KN += kv_head * stride_knh
    VN += kv_head * stride_vnh
    kv_col = kv_head * HEAD_DIM
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM

    n_pf = (prefix // BLOCK_N) * BLOCK_N  # whole prefix tiles; the tail runs key-bound masked
    n_new_full = (m_start // BLOCK_N) * BLOCK_N  # new keys every row sees, in whole tiles
    new_end = tl.minimum(extend, m_start + POSITIONS)
    lo = 0
    hi = n_pf
    tail_hi = prefix
    if SPLIT:  # split s takes its share of the prefix tiles; the last also everything else
        tiles = n_pf // BLOCK_N
        per = tl.cdiv(tiles, num_splits)
        lo = tl.minimum(split * per, tiles) * BLOCK_N
        hi = tl.minimum(split * per + per, tiles) * BLOCK_N
        last = split == num_splits - 1
        tail_hi = tl.where(last, prefix, n_pf)
        n_new_full = tl.where(last, n_new_full, 0)
        new_end = tl.where(last, new_end, 0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    q_abs = prefix + pos  # >= prefix: every prefix key is visible to every row
    # Cached prefix, each tile's addresses read one iteration ahead (loop-carried addresses
    # pipeline num_stages - 1 tiles deep, in-iteration ones one). POOL_TMA: the tiles on one run
    # of pages (extend_runs) load as TMA boxes of pool rows, the others by gather, both from the
    # request's tile list (unmasked tiles commute); else every tile by gather, in key order.
    if POOL_TMA:
        run_tiles = tl.load(RunTiles + req)
        tiles_row = Tiles + req.to(tl.int64) * stride_list
        rows_row = Rows + req.to(tl.int64) * stride_list
        lo_t = lo // BLOCK_N
        hi_t = hi // BLOCK_N
        run_hi = tl.minimum(hi_t, run_tiles)
        gather_lo = tl.maximum(lo_t, run_tiles)
        any_n = tl.arange(0, BLOCK_N)  # unmasked: key positions unused
        row = tl.load(rows_row + lo_t, mask=lo_t < run_hi, other=0)
        for i in range(lo_t, run_hi):
            next_row = tl.load(rows_row + i + 1, mask=i + 1 < run_hi, other=0)
            k = KP_desc.load([row, kv_col])
            p, alpha, m_i, l_i = _scores(q, k, m_i, l_i, qk_scale, any_n, q_abs, prefix, False,
                                         PRECISION, INTERPRET, EXP_FMA)  # fmt: skip
            v = VP_desc.load([row, kv_col])
            acc = mma_acc(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], PRECISION,
                          INTERPRET)  # fmt: skip
            row = next_row
        tile = tl.load(tiles_row + gather_lo, mask=gather_lo < hi_t, other=0)
        slots = _tile_slots(page_row, tile * BLOCK_N, prefix, PAGE_SIZE, BLOCK_N, PAGE_VEC)
        for i in range(gather_lo, hi_t):
            tile = tl.load(tiles_row + i + 1, mask=i + 1 < hi_t, other=0)
            next_slots = _tile_slots(page_row, tile * BLOCK_N, prefix, PAGE_SIZE, BLOCK_N,
                                     PAGE_VEC)  # fmt: skip
            k = _load_kv(K, slots, stride_kt, any_n, prefix, offs_d, mask_d, EVEN_D, False)
            p, alpha, m_i, l_i = _scores(q, k, m_i, l_i, qk_scale, any_n, q_abs, prefix, False,
                                         PRECISION, INTERPRET, EXP_FMA)  # fmt: skip
            v = _load_kv(V, slots, stride_vt, any_n, prefix, offs_d, mask_d, EVEN_D, False)
            acc = mma_acc(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], PRECISION,
                          INTERPRET)  # fmt: skip
            slots = next_slots
    else:
        slots = _tile_slots(page_row, lo, hi, PAGE_SIZE, BLOCK_N, PAGE_VEC)
        for start_n in range(lo, hi, BLOCK_N):
            next_slots = _tile_slots(page_row, start_n + BLOCK_N, hi, PAGE_SIZE, BLOCK_N,
                                     PAGE_VEC)  # fmt: skip
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_kv(K, slots, stride_kt, offs_n, prefix, offs_d, mask_d, EVEN_D, False)
            p, alpha, m_i, l_i = _scores(q, k, m_i, l_i, qk_scale, offs_n, q_abs, prefix, False,
                                         PRECISION, INTERPRET, EXP_FMA)  # fmt: skip
            v = _load_kv(V, slots, stride_vt, offs_n, prefix, offs_d, mask_d, EVEN_D, False)
            acc = mma_acc(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], PRECISION,
                          INTERPRET)  # fmt: skip
            slots = next_slots
    for start_n in range(n_pf, tail_hi, DIAG_N):  # < BLOCK_N prefix keys past the last tile
        slots_t = _tile_slots(page_row, start_n, prefix, PAGE_SIZE, DIAG_N, PAGE_VEC)
        offs_n = start_n + tl.arange(0, DIAG_N)
        k = _load_kv(K, slots_t, stride_kt, offs_n, prefix, offs_d, mask_d, EVEN_D, True)
        p, alpha, m_i, l_i = _scores(q, k, m_i, l_i, qk_scale, offs_n, q_abs, prefix, True,
                                     PRECISION, INTERPRET)  # fmt: skip
        v = _load_kv(V, slots_t, stride_vt, offs_n, prefix, offs_d, mask_d, EVEN_D, True)
        acc = mma_acc(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], PRECISION, INTERPRET)
    # New tokens from the dense tensors: keys every row sees, then the causal diagonal.
    for start_j in range(0, n_new_full, BLOCK_N):
        offs_j = start_j + tl.arange(0, BLOCK_N)
        k = _new_tile(KN_desc, KN, q_start + start_j, stride_knt, kv_col, extend - start_j,
                      offs_d, mask_d, BLOCK_N, USE_TMA, EVEN_D, False)  # fmt: skip
        p, alpha, m_i, l_i = _scores(q, k, m_i, l_i, qk_scale, offs_j, pos, extend, False,
                                     PRECISION, INTERPRET, EXP_FMA)  # fmt: skip
        v = _new_tile(VN_desc, VN, q_start + start_j, stride_vnt, kv_col, extend - start_j,
                      offs_d, mask_d, BLOCK_N, USE_TMA, EVEN_D, False)  # fmt: skip
        acc = mma_acc(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], PRECISION, INTERPRET)
    # Row pos sees key n_new_full <= m_start <= pos in the first of these tiles (no NaN rows).
    for start_j in range(n_new_full, new_end, DIAG_N):
        offs_j = start_j + tl.arange(0, DIAG_N)
        k = _new_tile(KN_diag, KN, q_start + start_j, stride_knt, kv_col, extend - start_j,
                      offs_d, mask_d, DIAG_N, USE_TMA, EVEN_D, True)  # fmt: skip
        p, alpha, m_i, l_i = _scores(q, k, m_i, l_i, qk_scale, offs_j, pos, extend, True,
                                     PRECISION, INTERPRET)  # fmt: skip
        v = _new_tile(VN_diag, VN, q_start + start_j, stride_vnt, kv_col, extend - start_j,
                      offs_d, mask_d, DIAG_N, USE_TMA, EVEN_D, True)  # fmt: skip
        acc = mma_acc(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], PRECISION, INTERPRET)

    io_mask = mask_m[:, None] & mask_d[None, :]
    if SPLIT:  # an empty split (no tiles) leaves l = 0: it writes lse -inf and weighs nothing
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        row = (split * num_tokens + tok) * (tl.num_programs(2) // num_splits * HEADS_PER_TILE) + head
        tl.store(PartO + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
                 mask=io_mask)
        tl.store(PartLse + row, tl.where(empty, float("-inf"), m_i + tl.log2(l_safe)), mask=mask_m)
    else:
        tl.store(Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=io_mask)


_TMA_FAILED: str | None = None  # why TMA descriptors failed to launch here (then pointer loads)


def new_kv_usable(k_new: torch.Tensor | None, v_new: torch.Tensor | None,
                  k_flat: torch.Tensor, num_tokens: int) -> bool:
    """The dense new-token path applies: one K/V row per new token, in the pool's dtype (a
    pool that stores another dtype would round differently from what was read back)."""
    return (k_new is not None and v_new is not None and k_new.dim() == 3
            and k_new.shape == v_new.shape and k_new.shape[0] == num_tokens
            and k_new.shape[1:] == k_flat.shape[1:] and k_new.dtype == k_flat.dtype
            and v_new.dtype == k_flat.dtype and k_new.stride(2) == 1 and v_new.stride(2) == 1)


def _tma_ready(t: torch.Tensor, head_dim: int, block_d: int) -> bool:
    """A [T, Hkv, D] tensor TMA can tile as [T, Hkv * D]: heads adjacent, 16-byte alignment."""
    el = t.element_size()
    return (block_d == head_dim and t.stride(1) == head_dim and t.data_ptr() % 16 == 0
            and (t.stride(0) * el) % 16 == 0 and head_dim * el >= 16)


def _descriptors(t: torch.Tensor, block_n: int, diag_n: int) -> tuple[object, object]:
    return row_descriptor(t, block_n), row_descriptor(t, diag_n)


def launch_newkv(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, k_new: torch.Tensor,
    v_new: torch.Tensor, out: torch.Tensor, part_o: torch.Tensor, part_lse: torch.Tensor,
    qo_indptr: torch.Tensor, prefix_lens: torch.Tensor, page_table: torch.Tensor,
    req_rows: torch.Tensor, page_size: int, qk_scale: float, grid: tuple[int, int, int],
    splits: int, group: int, block_d: int, cfg: ExtendConfig, precision: str, interpret: bool,
    reuse: ExtendReuse | None = None,
) -> None:  # fmt: skip
    """One launch of the kernel above (extend_attention prepares grid, splits and partials);
    ``reuse`` shares the prefix tile lists and pool descriptors among a step's layers."""
    global _TMA_FAILED
    num_tokens, _, head_dim = q.shape
    use_tma = (cfg.new_kv_tma and _TMA_FAILED is None and _tma_ready(k_new, head_dim, block_d)
               and _tma_ready(v_new, head_dim, block_d))
    descs: tuple[object, ...] = (None,) * 9 + (0,)
    if use_tma:
        (kd, kdd), (vd, vdd) = (_descriptors(t, cfg.block_n, cfg.diag_n) for t in (k_new, v_new))
        descs = (kd, vd, kdd, vdd) + (None,) * 5 + (0,)
        if cfg.pool_tma and _tma_ready(k_flat, head_dim, block_d) and _tma_ready(
                v_flat, head_dim, block_d):
            reuse = reuse or ExtendReuse()  # a lone call: lists and descriptors just for it
            tiles, rows, run_tiles = reuse.tiles(page_table, req_rows, prefix_lens, page_size,
                                                 cfg.block_n)  # fmt: skip
            kp, vp = (reuse.pool_descriptor(t, cfg.block_n) for t in (k_flat, v_flat))
            descs = (kd, vd, kdd, vdd, kp, vp, tiles, rows, run_tiles, tiles.stride(0))
    try:
        _launch(q, k_flat, v_flat, k_new, v_new, descs, out, part_o, part_lse, qo_indptr,
                prefix_lens, page_table, req_rows, page_size, qk_scale, grid, splits, group,
                block_d, cfg, precision, interpret, use_tma)
    except Exception as exc:  # noqa: BLE001 - a Triton build without TMA descriptors here
        if not use_tma:
            raise
        _TMA_FAILED = repr(exc)[:300]
        warnings.warn(f"extend_newkv: TMA descriptors failed, using pointer loads: {_TMA_FAILED}",
                      stacklevel=2)
        _launch(q, k_flat, v_flat, k_new, v_new, (None,) * 9 + (0,), out, part_o, part_lse,
                qo_indptr, prefix_lens, page_table, req_rows, page_size, qk_scale, grid, splits,
                group, block_d, cfg, precision, interpret, False)


def _launch(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, k_new: torch.Tensor,
    v_new: torch.Tensor, descs: tuple[object, ...], out: torch.Tensor, part_o: torch.Tensor,
    part_lse: torch.Tensor, qo_indptr: torch.Tensor, prefix_lens: torch.Tensor,
    page_table: torch.Tensor, req_rows: torch.Tensor, page_size: int, qk_scale: float,
    grid: tuple[int, int, int], splits: int, group: int, block_d: int, cfg: ExtendConfig,
    precision: str, interpret: bool, use_tma: bool,
) -> None:  # fmt: skip
    num_tokens, _, head_dim = q.shape
    _extend_newkv_kernel[grid](
        q, k_flat, v_flat, k_new, v_new, *descs, out, part_o, part_lse, qo_indptr, prefix_lens,
        page_table, req_rows, qk_scale, q.stride(0), q.stride(1), k_flat.stride(0),
        k_flat.stride(1), v_flat.stride(0), v_flat.stride(1), k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        num_tokens, splits,
        GROUP=group, HEADS_PER_TILE=cfg.heads_per_tile, HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE_SIZE=page_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DIAG_N=cfg.diag_n,
        PAGE_VEC=cfg.page_vec, SPLIT=splits > 1, USE_TMA=use_tma, POOL_TMA=descs[6] is not None,
        EXP_FMA=cfg.exp_fma, PRECISION=precision,
        INTERPRET=interpret, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
