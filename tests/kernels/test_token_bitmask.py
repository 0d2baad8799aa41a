"""The fused bitmask apply against its torch reference (and both against a per-token loop)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from radixrt.kernels.token_bitmask import (  # noqa: E402
    apply_token_bitmask_torch,
    apply_token_bitmask_triton,
)


def _loop_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    m = bitmask.cpu().tolist()
    for r in range(out.shape[0]):
        for t in range(out.shape[1]):
            if not (m[r][t // 32] >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab", [37, 4096 + 5])
def test_bitmask_apply_matches_reference(device, vocab):
    batch = 5
    logits = torch.randn(batch, vocab, device=device)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, words), dtype=torch.int32, device=device)
    bitmask[1] = -1  # an unconstrained row: untouched
    bitmask[2] = 0  # nothing allowed (never happens in use, but must not write out of row)
    bitmask[3, 0] = 1 << 5  # exactly token 5 among the first 32
    want = _loop_reference(logits.cpu(), bitmask.cpu()) if vocab < 100 else None
    ref = logits.clone()
    apply_token_bitmask_torch(ref, bitmask)
    got = logits.clone()
    apply_token_bitmask_triton(got, bitmask)
    assert torch.equal(got.cpu(), ref.cpu())
    assert torch.equal(got[1].cpu(), logits[1].cpu())
    assert torch.isinf(got[2]).all()
    assert torch.isfinite(got[3, 5]) and torch.isinf(got[3, :5]).all()
    if want is not None:
        assert torch.equal(ref.cpu(), want)


def test_bitmask_apply_on_a_row_slice_keeps_other_rows(device):
    # Strided rows (a view over a wider logits buffer) are written in their own row only.
    base = torch.randn(4, 80, device=device)
    view = base[:, :70]
    bitmask = torch.zeros(4, 3, dtype=torch.int32, device=device)
    apply_token_bitmask_triton(view, bitmask)
    assert torch.isinf(base[:, :70]).all() and torch.isfinite(base[:, 70:]).all()
