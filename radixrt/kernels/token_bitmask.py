"""Apply a packed token bitmask to a batch's logits in one pass: logits[r, t] = -inf where bit
``t`` of ``bitmask[r]`` is 0.

Layout (xgrammar's): ``bitmask`` is int32 ``[B, ceil(V / 32)]``; token ``t`` is bit ``t % 32``
of word ``t // 32``::

    word w:   bit 0 .. bit 31   <->   tokens 32w .. 32w + 31

One program per (row, block of BLOCK tokens): it loads BLOCK / 32 words once, expands them to
BLOCK lanes with a shift and writes -inf only where a bit is clear. Rows without a grammar
carry all-ones words (-1) and are left as they are; the whole batch is one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit(do_not_specialize=["V"])
def _apply_bitmask_kernel(X, M, V, stride_x, stride_m, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    inside = offs < V
    words = tl.load(M + row * stride_m + offs // 32, mask=inside, other=-1)
    allowed = ((words >> (offs % 32)) & 1) != 0
    tl.store(X + row * stride_x + offs, float("-inf"), mask=inside & ~allowed)


def apply_token_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place on ``logits`` [B, V] (any float dtype, last dim contiguous)."""
    B, V = logits.shape
    assert bitmask.dtype == torch.int32 and bitmask.shape[0] == B, (
        f"need an int32 bitmask with {B} rows, got {bitmask.dtype} {tuple(bitmask.shape)}")
    assert bitmask.shape[1] * 32 >= V, f"bitmask covers {bitmask.shape[1] * 32} < {V} tokens"
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1, "last dims must be contiguous"
    if B == 0:
        return
    grid = (B, triton.cdiv(V, BLOCK))
    _apply_bitmask_kernel[grid](logits, bitmask, V, logits.stride(0), bitmask.stride(0),
                                BLOCK=BLOCK)


def apply_token_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The reference (and the CPU path): unpack the bits, fill -inf where clear."""
    B, V = logits.shape
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [B, W, 32]
    allowed = bits.reshape(B, -1)[:, :V].to(torch.bool)  # [B, V]
    logits.masked_fill_(~allowed, float("-inf"))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Triton on CUDA; on the CPU xgrammar's C++ loop (3x the torch unpacking at 256 x 49k),
    or torch where that is missing or does not take the dtype."""
    if logits.is_cuda:
        apply_token_bitmask_triton(logits, bitmask)
        return
    if logits.dtype == torch.float32 and logits.is_contiguous():
        try:
            import xgrammar as xgr
        except ImportError:
            pass
        else:
            xgr.apply_token_bitmask_inplace(logits, bitmask.contiguous(), backend="cpu")
            return
    apply_token_bitmask_torch(logits, bitmask)
