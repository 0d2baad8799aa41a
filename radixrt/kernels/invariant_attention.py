"""Batch-invariant paged attention: one reduction order for prefill chunks and decode steps, so a
query's output depends only on that query and its request's KV, never on how the step was formed.

Deterministic inference runs every attention call through it. The fast kernels are not
invariant: ``decode_attention`` splits the KV into a number of pieces chosen from the batch
size, and ``extend_attention`` takes a mask-free path for keys below its query tile, so the
same (query, key block) pair goes through different code depending on where the cached prefix
ended; a token decoded inside a mixed batch goes through yet another kernel than one decoded in
a pure decode step. Here every query row does the same arithmetic wherever it is computed:

    tile rows   (BLOCK_M = TOKENS x GROUP_P, the GQA group packed as in decode)
                row r -> token t0 + r // GROUP_P, query head kv_head * GROUP + r % GROUP_P
    keys        fixed chunks of CHUNK keys aligned to position 0; inside a chunk, blocks of
                BLOCK_N keys, every block masked, online softmax from a fresh state
    chunks      merged left to right: state = merge(... merge(chunk 0, chunk 1) ..., chunk c)

    positions   0 ......... CHUNK ......... 2 CHUNK ...... p
                [ chunk 0  ][ chunk 1      ][ chunk 2 ..]|
                 merged in this order, in one program (prefill, large decode batches) or one
                 program per chunk + an ordered merge launch (small decode batches: split)

The split changes who computes a chunk, not the arithmetic: both paths run the same chunk code
and the same merge function, compiled without FMA contraction, so they give the same bits and
the split can be chosen from the batch size for speed. A chunk or block past a row's own
position is fully masked for that row and adds exact zeros (its max stays -inf, its weight in
the merge is exp2(-inf) = 0).

Grid: (token tiles of the longest request [or chunks when split], KV heads, requests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixrt.kernels.extend_attention import LOG2E, _attend_block
from radixrt.kernels.paged_inputs import check_paged_inputs, check_rows, dot_precision, interpreting


@triton.jit
def _merge(m_a, l_a, acc_a, m_b, l_b, acc_b):
    """Two softmax partial states (max, denominator, unnormalized output) -> their union."""
    m = tl.maximum(m_a, m_b)
    s_a = tl.exp2(m_a - m)  # 0 for the empty starting state (m is finite: key 0 is in chunk 0)
    s_b = tl.exp2(m_b - m)  # 0 for a chunk that was fully masked for the row
    return m, l_a * s_a + l_b * s_b, acc_a * s_a[:, None] + acc_b * s_b[:, None]


@triton.jit
def _chunk_state(
    q, K, V, page_row, chunk_start, kv_end, q_pos, kv_head,
    stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, offs_d, mask_d,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Online softmax over keys [chunk_start, min(chunk_start + CHUNK, kv_end)) from scratch."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    chunk_end = tl.minimum(chunk_start + CHUNK, kv_end)
    for start_n in range(chunk_start, chunk_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, K, V, page_row, start_n, chunk_end, q_pos, kv_head,
            stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, offs_d, mask_d,
            PAGE_SIZE, BLOCK_N, True, PRECISION, INTERPRET, True,
        )  # fmt: skip
    return m_i, l_i, acc


# One compiled variant for every page-table width (the engine's table, tests' one-off ones).
@triton.jit(do_not_specialize=["stride_pt"])
def _invariant_attention_kernel(
    Q,  # [T, Hq, D]
    K,  # [S, Hkv, D] flat pool layer
    V,  # [S, Hkv, D]
    Out,  # [T, Hq, D]
    PartM,  # split: [B, Hkv, MAX_CHUNKS, GROUP_P] fp32
    PartL,  # split: [B, Hkv, MAX_CHUNKS, GROUP_P] fp32
    PartAcc,  # split: [B, Hkv, MAX_CHUNKS, GROUP_P, D] fp32
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
    GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
    SPLIT: tl.constexpr,  # one program per chunk (decode only), partial states out
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    TOKENS: tl.constexpr = BLOCK_M // GROUP_P
    kv_head = tl.program_id(1)
    req = tl.program_id(2)
    q_start = tl.load(qo_indptr + req)
    extend = tl.load(qo_indptr + req + 1) - q_start
    t0 = 0 if SPLIT else tl.program_id(0) * TOKENS
    if t0 >= extend:  # this request is shorter than the longest one
        return
    prefix = tl.load(prefix_lens + req)
    kv_end = tl.minimum(prefix + extend, prefix + t0 + TOKENS)
    if SPLIT:  # noqa: SIM102 - constexpr test kept apart from the runtime one for Triton
        if tl.program_id(0) * CHUNK >= kv_end:  # past this request's KV
            return
    page_row = page_table + tl.load(req_rows + req).to(tl.int64) * stride_pt

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
    q_pos = prefix + tok  # every row, padding included, sees key 0: chunk 0 is never empty

    if SPLIT:
        chunk = tl.program_id(0)
        m_c, l_c, acc_c = _chunk_state(
            q, K, V, page_row, chunk * CHUNK, kv_end, q_pos, kv_head,
            stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, offs_d, mask_d,
            BLOCK_M, BLOCK_D, PAGE_SIZE, BLOCK_N, CHUNK, PRECISION, INTERPRET,
        )  # fmt: skip
        # Decode: one token, so rows 0 .. GROUP_P-1 are all there is.
        slot = ((req.to(tl.int64) * tl.num_programs(1) + kv_head) * MAX_CHUNKS + chunk) * GROUP_P
        keep = offs_r < GROUP_P
        tl.store(PartM + slot + offs_r, m_c, mask=keep)
        tl.store(PartL + slot + offs_r, l_c, mask=keep)
        tl.store(
            PartAcc + (slot + offs_r)[:, None] * HEAD_DIM + offs_d[None, :], acc_c,
            mask=keep[:, None] & mask_d[None, :],
        )  # fmt: skip
    else:
        # Merging chunk 0 into the empty state gives chunk 0's state exactly (weights 0 and 1).
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for chunk_start in range(0, kv_end, CHUNK):
            m_c, l_c, acc_c = _chunk_state(
                q, K, V, page_row, chunk_start, kv_end, q_pos, kv_head,
                stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, offs_d, mask_d,
                BLOCK_M, BLOCK_D, PAGE_SIZE, BLOCK_N, CHUNK, PRECISION, INTERPRET,
            )  # fmt: skip
            m_i, l_i, acc = _merge(m_i, l_i, acc, m_c, l_c, acc_c)
        tl.store(
            Out + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            (acc / l_i[:, None]).to(Out.dtype.element_ty),
            mask=mask_r[:, None] & mask_d[None, :],
        )


@triton.jit
def _merge_chunks_kernel(
    PartM, PartL, PartAcc, Out, seq_lens, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr, MAX_CHUNKS: tl.constexpr,
):  # fmt: skip
    """Split decode, second launch: merge request ``req``'s chunk states in chunk order."""
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    offs_h = tl.arange(0, GROUP_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    base = (req.to(tl.int64) * tl.num_programs(1) + kv_head) * MAX_CHUNKS * GROUP_P
    acc = tl.zeros([GROUP_P, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([GROUP_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_P], dtype=tl.float32)
    num_chunks = tl.cdiv(tl.load(seq_lens + req), CHUNK)
    for chunk in range(0, num_chunks):
        slot = base + chunk * GROUP_P + offs_h
        m_c = tl.load(PartM + slot)
        l_c = tl.load(PartL + slot)
        acc_c = tl.load(PartAcc + slot[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=mask_d[None, :], other=0.0)
        m_i, l_i, acc = _merge(m_i, l_i, acc, m_c, l_c, acc_c)
    head = kv_head * GROUP + offs_h
    tl.store(
        Out + req.to(tl.int64) * stride_ob + head[:, None] * stride_oh + offs_d[None, :],
        (acc / l_i[:, None]).to(Out.dtype.element_ty),
        mask=(offs_h < GROUP)[:, None] & mask_d[None, :],
    )


def invariant_tile(group: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): a function of the model alone."""
    group_p = triton.next_power_of_2(group)
    if device.type != "cuda":
        return max(16, group_p), 16, 1, 1
    # 16 rows: a decode step (one token per request) wastes little MMA work; prefill tiles of
    # 16 / GROUP tokens re-read K/V, mostly from L2.
    return max(16, group_p), 64, 4, 2


def invariant_chunk(max_context_len: int, device: torch.device) -> int:
    """Keys per chunk: fixed per model, a multiple of every BLOCK_N, at most 256 chunks."""
    floor = 1024 if device.type == "cuda" else 32
    return max(floor, triton.next_power_of_2(triton.cdiv(max_context_len, 256)))


class SplitBuffers:
    """Chunk states of a split decode step for up to ``max_batch`` requests."""

    def __init__(self, max_batch: int, num_kv_heads: int, group: int, head_dim: int,
                 max_chunks: int, device: torch.device | str) -> None:
        rows = max_batch * num_kv_heads * max_chunks * triton.next_power_of_2(group)
        self.max_batch, self.max_chunks = max_batch, max_chunks
        self.m = torch.empty(rows, dtype=torch.float32, device=device)
        self.l = torch.empty(rows, dtype=torch.float32, device=device)
        self.acc = torch.empty(rows * head_dim, dtype=torch.float32, device=device)


def invariant_attention(
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
    *,
    chunk: int,
    split: SplitBuffers | None = None,  # decode steps only: one program per KV chunk
    seq_lens: torch.Tensor | None = None,  # [B] int32, needed with split
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each request's new queries (1 for decode) over its whole KV. Results
    are bitwise the same for any batch, any prefix/suffix split, and with or without ``split``."""
    check_paged_inputs(q, k_flat, v_flat, page_size)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1, "out must be [T, Hq, D], D contiguous"
    batch = req_rows.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    check_rows(page_table, req_rows, prefix_lens)
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    block_m, block_n, num_warps, num_stages = invariant_tile(group, q.device)
    assert chunk % block_n == 0, f"chunk {chunk} must be a multiple of BLOCK_N {block_n}"
    if split is not None:
        assert max_extend_len == 1 and num_tokens == batch, "split is for decode steps only"
        assert seq_lens is not None, "split needs seq_lens"
        assert batch <= split.max_batch, f"batch {batch} > split buffers' {split.max_batch}"
        grid = (split.max_chunks, num_kv_heads, batch)
        parts = (split.m, split.l, split.acc)
        max_chunks = split.max_chunks
    else:
        grid = (triton.cdiv(max_extend_len, block_m // group_p), num_kv_heads, batch)
        parts = (out, out, out)  # never touched
        max_chunks = 1
    common = dict(GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim,
                  BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CHUNK=chunk,
                  MAX_CHUNKS=max_chunks)
    # No FMA contraction: the in-program merge and the split path's merge launch must round
    # the same expressions the same way.
    _invariant_attention_kernel[grid](
        q, k_flat, v_flat, out, *parts, qo_indptr, prefix_lens, page_table, req_rows, scale * LOG2E,
        q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1),
        v_flat.stride(0), v_flat.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split is not None,
        PRECISION=dot_precision(q.dtype), INTERPRET=interpreting(), num_warps=num_warps,
        num_stages=num_stages, enable_fp_fusion=False, **common,
    )  # fmt: skip
    if split is not None:
        assert seq_lens is not None
        _merge_chunks_kernel[(batch, num_kv_heads)](
            split.m, split.l, split.acc, out, seq_lens, out.stride(0), out.stride(1),
            num_warps=4 if q.device.type == "cuda" else 1, enable_fp_fusion=False, **common,
        )  # fmt: skip
    return out
