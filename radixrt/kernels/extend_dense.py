"""New-token x new-token attention of long extends on torch's fused SDPA (cuDNN, else flash).

On an H200 torch's dense SDPA reached 76% of the matmul rate on a 32k causal prompt where the
paged kernel reached 55% (bench/recorded/h200_s4_prefill1). The new tokens' K/V are contiguous
once gathered from the pool, so their causal square can run there, returning its log-sum-exp;
the paged kernel then covers only the cached prefix (no causal masks) and the two merge by
log-sum-exp like split-KV partials. Used for extends of at least
``extend_configs.DENSE_NEW_MIN_TOKENS`` tokens (None: never), on CUDA in 16-bit dtypes.

``dense_extend`` goes further for batches of long extends only (every request at least
``extend_configs.DENSE_EXTEND_MIN_TOKENS`` new tokens: a long prompt's chunks): the cached
prefix is gathered from its pages into dense K/V too, so the whole extend runs on the fused op:

    keys:    [ prefix chunk 0 | prefix chunk 1 | ... | new tokens ]
    part:    [      1         |       2        | ... |     0      ]   (part 0 causal, others full)

each part returns its output and log-sum-exp, and ``merge_splits`` weighs them. The prefix is
cut into chunks of ``DENSE_PREFIX_CHUNK`` keys so the gathered copy stays bounded.
"""

from __future__ import annotations

import torch
import triton

from radixrt.kernels import extend_configs
from radixrt.kernels.extend_split import merge_splits

LOG2E = 1.4426950408889634
_WORKS: dict[str, bool] = {}  # which fused SDPA op with log-sum-exp runs here, probed on use
# Keys per gathered prefix chunk: 128k keys x 8 KV heads x 128 x 2 bytes = 256 MiB per K or V copy.
DENSE_PREFIX_CHUNK = 131072


def use_dense_new(q: torch.Tensor, max_extend_len: int) -> bool:
    threshold = extend_configs.DENSE_NEW_MIN_TOKENS
    return (threshold is not None and max_extend_len >= threshold and q.device.type == "cuda"
            and q.dtype in (torch.float16, torch.bfloat16))


def new_token_slots(qo_indptr: torch.Tensor, prefix_lens: torch.Tensor, page_table: torch.Tensor,
                    req_rows: torch.Tensor, page_size: int, num_tokens: int) -> torch.Tensor:
    """Pool slot of every new token ([T] int64), on the device without a host sync."""
    dev = qo_indptr.device
    lens = (qo_indptr[1:] - qo_indptr[:-1]).long()
    req = torch.repeat_interleave(torch.arange(lens.shape[0], device=dev), lens,
                                  output_size=num_tokens)
    pos = prefix_lens.long()[req] + torch.arange(num_tokens, device=dev) - qo_indptr.long()[req]
    page = page_table[req_rows.long()[req], pos // page_size].long()
    return page * page_size + pos % page_size


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of [1, H, E, D] queries over [1, H, L, D] keys (causal: E == L, query i sees
    keys <= i): (output [1, H, E, D], natural-log LSE [1, H, E])."""
    assert not causal or q.shape[2] == k.shape[2], "causal parts are square (new x new)"
    errors = []
    # cuDNN first, then flash; each with the strided views, then contiguous copies.
    for name, contiguous in (("cudnn", False), ("cudnn", True), ("flash", False), ("flash", True)):
        key = f"{name}{'-contiguous' if contiguous else ''}"
        if _WORKS.get(key) is False:
            continue
        a, b, c = (t.contiguous() for t in (q, k, v)) if contiguous else (q, k, v)
        try:
            if name == "cudnn":
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    a, b, c, None, True, 0.0, causal, False, scale=scale)
            else:
                res = torch.ops.aten._scaled_dot_product_flash_attention(
                    a, b, c, 0.0, causal, False, scale=scale)
        except (RuntimeError, TypeError, AttributeError, NotImplementedError) as exc:
            _WORKS[key] = False
            errors.append(f"{key}: {exc!r}"[:200])
            continue
        _WORKS[key] = True
        return res[0], res[1].reshape(q.shape[:3])
    raise RuntimeError("no fused SDPA with log-sum-exp here: " + "; ".join(errors))


def dense_new_part(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, qo_indptr: torch.Tensor,
    prefix_lens: torch.Tensor, page_table: torch.Tensor, req_rows: torch.Tensor, page_size: int,
    scale: float, part_o: torch.Tensor, part_lse: torch.Tensor,
) -> None:  # fmt: skip
    """Into part_o [T, Hq, D] fp32 and part_lse [T, Hq] (base 2): each request's new tokens
    attending causally to its new tokens only."""
    num_tokens, num_heads, _ = q.shape
    group = num_heads // k_flat.shape[1]
    slots = new_token_slots(qo_indptr, prefix_lens, page_table, req_rows, page_size, num_tokens)
    k_new = k_flat[slots].repeat_interleave(group, dim=1)  # [T, Hq, D]: no GQA in the op
    v_new = v_flat[slots].repeat_interleave(group, dim=1)
    starts = qo_indptr.tolist()  # one host sync, on this long-extend path only
    for s0, s1 in zip(starts[:-1], starts[1:]):
        if s1 == s0:
            continue
        qb, kb, vb = (t[s0:s1].transpose(0, 1).unsqueeze(0) for t in (q, k_new, v_new))
        o, lse = sdpa_with_lse(qb, kb, vb, scale)
        part_o[s0:s1] = o[0].transpose(0, 1)
        part_lse[s0:s1] = lse[0].transpose(0, 1) * LOG2E


def use_dense_extend(q: torch.Tensor, extend_lens: list[int]) -> bool:
    """Whether ``dense_extend`` takes this batch: every request long, CUDA, 16-bit."""
    threshold = extend_configs.DENSE_EXTEND_MIN_TOKENS
    return (threshold is not None and bool(extend_lens) and min(extend_lens) >= threshold
            and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16))


def prefix_slots(page_table: torch.Tensor, row: int, prefix_len: int,
                 page_size: int) -> torch.Tensor:
    """Pool slots of a request's first ``prefix_len`` tokens ([P] int64, on the device)."""
    pages = page_table[row, : triton.cdiv(prefix_len, page_size)].long()
    offs = torch.arange(page_size, device=page_table.device)
    return (pages[:, None] * page_size + offs).flatten()[:prefix_len]


def _as_heads(x: torch.Tensor) -> torch.Tensor:
    """[L, Hkv, D] -> a [1, Hkv, L, D] view: both fused ops take GQA (fewer K/V heads) as is
    (bench/sdpa_probe.py on an H200: errors at bf16 rounding), so no head-expanded copy."""
    return x.transpose(0, 1).unsqueeze(0)


def dense_extend(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, k_new: torch.Tensor,
    v_new: torch.Tensor, page_table: torch.Tensor, page_size: int, scale: float,
    extend_lens: list[int], prefix_lens: list[int], req_rows: list[int], out: torch.Tensor,
    prefix_chunk: int = DENSE_PREFIX_CHUNK,
) -> torch.Tensor:  # fmt: skip
    """Causal attention of each request's new tokens (q [T, Hq, D], k_new / v_new [T, Hkv, D],
    the step's own K/V) over its cached prefix (in the pool's pages) plus themselves, into out
    [T, Hq, D], entirely on torch's fused SDPA. Host lengths only: no device sync."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    assert prefix_chunk >= 1, f"bad prefix chunk {prefix_chunk}"
    start = 0
    for extend, prefix, row in zip(extend_lens, prefix_lens, req_rows):
        end = start + extend
        qb = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, E, D]
        kb, vb = _as_heads(k_new[start:end]), _as_heads(v_new[start:end])
        if prefix == 0:
            o, _ = sdpa_with_lse(qb, kb, vb, scale)
            out[start:end] = o[0].transpose(0, 1)
            start = end
            continue
        chunks = triton.cdiv(prefix, prefix_chunk)
        part_o = torch.empty(chunks + 1, extend, num_heads, head_dim, dtype=torch.float32,
                             device=q.device)
        part_lse = torch.empty(chunks + 1, extend, num_heads, dtype=torch.float32, device=q.device)
        o, lse = sdpa_with_lse(qb, kb, vb, scale)
        part_o[0], part_lse[0] = o[0].transpose(0, 1), lse[0].transpose(0, 1) * LOG2E
        del kb, vb
        slots = prefix_slots(page_table, row, prefix, page_size)
        for c in range(chunks):
            sl = slots[c * prefix_chunk:(c + 1) * prefix_chunk]
            kp, vp = _as_heads(k_flat[sl]), _as_heads(v_flat[sl])
            o, lse = sdpa_with_lse(qb, kp, vp, scale, causal=False)
            part_o[c + 1], part_lse[c + 1] = o[0].transpose(0, 1), lse[0].transpose(0, 1) * LOG2E
            del kp, vp
        merge_splits(part_o, part_lse, out[start:end])
        start = end
    return out
