"""Sort-free top-p filtering vs the sampler's sorted definition (keep rank j while the
probability mass ranked before it is < top_p)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from radixrt.kernels.top_p import top_p_filter  # noqa: E402

NEG_INF = float("-inf")


def sorted_reference(x: torch.Tensor, top_p: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(filtered logits, |mass before the token - top_p| per token) by full sort."""
    sx, order = x.sort(dim=-1, descending=True, stable=True)
    probs = torch.softmax(sx.double(), -1)
    before = probs.cumsum(-1) - probs
    p = torch.tensor([q if q < 1 else float("inf") for q in top_p], dtype=torch.float64,
                     device=x.device)[:, None]
    kept = sx.masked_fill(before >= p, NEG_INF)
    out = torch.empty_like(x).scatter_(1, order, kept)
    margin = torch.empty_like(before).scatter_(1, order, (before - p).abs())
    return out, margin


def _shape(device: str) -> tuple[int, int]:
    return (64, 152064) if device == "cuda" else (6, 3000)


def test_top_p_matches_the_sorted_definition(device):
    batch, vocab = _shape(device)
    scales = torch.tensor([0.3, 1.0, 3.0, 8.0, 20.0, 1.0] * (batch // 6 + 1))[:batch, None]
    x = (torch.randn(batch, vocab) * scales).to(device)
    x[-1, 100:] = NEG_INF  # a row that min-p / top-k already cut
    top_p = [0.9, 0.5, 0.99, 0.3, 0.95, 1.0] * (batch // 6 + 1)
    top_p = top_p[:batch]
    got = top_p_filter(x, torch.tensor(top_p, device=device))
    want, margin = sorted_reference(x, top_p)
    differs = (got == NEG_INF) != (want == NEG_INF)
    # Sums in another order may only disagree for a token whose mass-before is within rounding
    # of top_p.
    assert not (differs & (margin > 1e-5)).any(), "kept set differs away from the boundary"
    kept = got != NEG_INF
    assert torch.equal(got[kept], x[kept]), "kept logits must pass through unchanged"
    assert torch.equal(got[top_p.index(1.0)], x[top_p.index(1.0)]), "top_p = 1 keeps the row"
    assert kept.any(dim=1).all(), "every row keeps at least its top token"


def test_top_p_keeps_a_tie_at_the_threshold_whole(device):
    # probs ~ 0.47, 0.17 x 3, 0.02: top_p 0.6 reaches past the first tied token; all three stay.
    x = torch.tensor([[2.0, 1.0, 1.0, 1.0, -1.0]], device=device)
    got = top_p_filter(x, torch.tensor([0.6], device=device))
    assert (got[0, :4] == x[0, :4]).all() and got[0, 4] == NEG_INF
    tiny = top_p_filter(x, torch.tensor([1e-6], device=device))
    assert (tiny[0, 0] == 2.0) and (tiny[0, 1:] == NEG_INF).all(), "tiny top_p keeps the max only"
