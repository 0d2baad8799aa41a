"""Reference attention over the paged pool in plain torch: gather each request's KV through its
row of the page table and run causal attention with the mask offset by the cached prefix length.

Slow (a Python loop over requests) and exact; it is the oracle the Triton kernels are tested
against and the CPU path of the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixrt.attention.base import AttentionBackend

if TYPE_CHECKING:
    from radixrt.cache.kv_pool import KVPool
    from radixrt.engine.batch import ForwardBatch
    from radixrt.engine.cascade_groups import CascadePolicy


def gather_slots(page_table_row: torch.Tensor, seq_len: int, page_size: int) -> torch.Tensor:
    """Flat pool slots of positions 0..seq_len-1 for one request ([seq_len] int64)."""
    pos = torch.arange(seq_len, device=page_table_row.device)
    pages = page_table_row.long()[pos // page_size]
    return pages * page_size + pos % page_size


def paged_attention_reference(
    q: torch.Tensor,  # [T, Hq, D]
    k_flat: torch.Tensor,  # [S, Hkv, D] pool layer (already holding this step's K)
    v_flat: torch.Tensor,  # [S, Hkv, D]
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    num_heads, num_kv_heads = q.shape[1], k_flat.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    start = 0
    for i, (prefix, extend) in enumerate(zip(batch.prefix_lens_cpu, batch.extend_lens_cpu)):
        seq_len = prefix + extend
        slots = gather_slots(batch.page_table[batch.req_rows_cpu[i]], seq_len, batch.page_size)
        k = k_flat[slots].float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_flat[slots].float().repeat_interleave(group, dim=1)
        qi = q[start : start + extend].float()  # [E, Hq, D]
        scores = torch.einsum("ehd,lhd->hel", qi, k) * scale  # [Hq, E, L]
        # Query j (absolute position prefix + j) sees keys 0..prefix + j.
        q_pos = torch.arange(extend, device=q.device)[:, None] + prefix
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start : start + extend] = torch.einsum("hel,lhd->ehd", probs, v).to(q.dtype)
        start += extend
    return out


def paged_decode_reference(
    q: torch.Tensor,  # [B, Hq, D] one query per request
    k_flat: torch.Tensor,  # [S, Hkv, D]
    v_flat: torch.Tensor,  # [S, Hkv, D]
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]
    """Decode for the whole batch at once: gather every request's KV padded to the longest."""
    bsz, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    group = num_heads // num_kv_heads
    max_len = batch.max_seq_len
    pos = torch.arange(max_len, device=q.device)  # [L]
    rows = batch.page_table.index_select(0, batch.req_rows.long())  # [B, max_pages]
    pages = rows.long()[:, pos // batch.page_size]  # [B, L]
    valid = pos[None, :] < batch.seq_lens.long()[:, None]  # [B, L]
    # Past its length a row holds stale page ids (the device table is reused): read slot 0.
    slots = torch.where(valid, pages * batch.page_size + pos % batch.page_size, 0)  # [B, L]
    k = k_flat[slots].float()  # [B, L, Hkv, D]
    v = v_flat[slots].float()
    qg = q.float().view(bsz, num_kv_heads, group, head_dim)  # [B, Hkv, G, D]
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale  # [B, Hkv, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgl,blhd->bhgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(bsz, num_heads, head_dim).to(q.dtype)


def _partial(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised attention output and natural-log LSE of queries ``qg`` [N, Hkv, G, D] over
    keys [N, L, Hkv, D] where ``valid`` [N, L]; rows without a valid key give (0, -inf)."""
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [N, Hkv, G]
    probs = torch.exp(scores - torch.where(lse.isinf(), 0.0, lse)[..., None])
    return torch.einsum("bhgl,blhd->bhgd", probs, v), lse


def cascade_decode_reference(
    q: torch.Tensor,  # [B, Hq, D]
    k_flat: torch.Tensor,  # [S, Hkv, D]
    v_flat: torch.Tensor,  # [S, Hkv, D]
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]
    """Decode the cascade way (``batch.cascade``): each group's shared prefix once for all its
    members, each request's own suffix, merged by log-sum-exp; in fp32."""
    groups = batch.cascade
    assert groups is not None, "cascade reference needs the batch's groups"
    bsz, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    qg = q.float().view(bsz, num_kv_heads, num_heads // num_kv_heads, head_dim)
    ps = batch.page_size
    starts = torch.zeros(bsz, dtype=torch.long, device=q.device)
    members = torch.as_tensor(groups.members, device=q.device)
    sizes = torch.as_tensor(groups.indptr[1:] - groups.indptr[:-1], device=q.device)
    starts[members] = torch.as_tensor(groups.shared_lens, device=q.device).repeat_interleave(sizes)
    # Own suffixes [start, seq_len), all requests at once (padded to the longest).
    pos = torch.arange(batch.max_seq_len, device=q.device)
    rows = batch.page_table.index_select(0, batch.req_rows.long())
    valid = (pos[None, :] < batch.seq_lens.long()[:, None]) & (pos[None, :] >= starts[:, None])
    slots = torch.where(valid, rows.long()[:, pos // ps] * ps + pos % ps, 0)
    out, lse = _partial(qg, k_flat[slots].float(), v_flat[slots].float(), valid, scale)
    for g in range(groups.num_groups):
        idx = members[int(groups.indptr[g]) : int(groups.indptr[g + 1])]
        length = int(groups.shared_lens[g])
        shared = gather_slots(batch.page_table[int(groups.rows[g])], length, ps)
        k = k_flat[shared].float()[None].expand(len(idx), -1, -1, -1)  # read once, all members
        v = v_flat[shared].float()[None].expand(len(idx), -1, -1, -1)
        all_valid = torch.ones(len(idx), length, dtype=torch.bool, device=q.device)
        p_out, p_lse = _partial(qg[idx], k, v, all_valid, scale)
        m = torch.maximum(lse[idx], p_lse)
        w_s, w_p = torch.exp(lse[idx] - m), torch.exp(p_lse - m)
        out[idx] = (out[idx] * w_s[..., None] + p_out * w_p[..., None]) / (w_s + w_p)[..., None]
    return out.reshape(bsz, num_heads, head_dim).to(q.dtype)


class TorchReferenceBackend(AttentionBackend):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, *,
                 cascade: CascadePolicy | None = None) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        self.cascade_policy = cascade

    def prepare(self, batch: ForwardBatch) -> None:
        # Nothing to precompute: the reference reads the batch's host lists directly.
        return None

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pool: KVPool,
        batch: ForwardBatch,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pool.store(layer_id, batch.out_slots, k, v)
        k_flat, v_flat = pool.k_flat(layer_id), pool.v_flat(layer_id)
        if batch.is_decode and batch.cascade is not None and self.cascade_policy is not None:
            result = cascade_decode_reference(q, k_flat, v_flat, batch, self.scale)
        elif batch.is_decode:
            result = paged_decode_reference(q, k_flat, v_flat, batch, self.scale)
        else:
            result = paged_attention_reference(q, k_flat, v_flat, batch, self.scale)
        return result if out is None else out.copy_(result)
