"""New-token x new-token attention of long extends on torch's fused SDPA (cuDNN, else flash).

On an H200 torch's dense SDPA reached 76% of the matmul rate on a 32k causal prompt where the
paged kernel reached 55% (bench/recorded/h200_s4_prefill1). The new tokens' K/V are contiguous
once gathered from the pool, so their causal square can run there, returning its log-sum-exp;
the paged kernel then covers only the cached prefix (no causal masks) and the two merge by
log-sum-exp like split-KV partials. Used for extends of at least
``extend_configs.DENSE_NEW_MIN_TOKENS`` tokens (None: never), on CUDA in 16-bit dtypes.
"""

from __future__ import annotations

import torch

from radixrt.kernels import extend_configs

LOG2E = 1.4426950408889634
_WORKS: dict[str, bool] = {}  # which fused SDPA op with log-sum-exp runs here, probed on use


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


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of [1, H, E, D] inputs: (output [1, H, E, D], natural-log LSE [1, H, E])."""
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
                    a, b, c, None, True, 0.0, True, False, scale=scale)
            else:
                res = torch.ops.aten._scaled_dot_product_flash_attention(
                    a, b, c, 0.0, True, False, scale=scale)
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
