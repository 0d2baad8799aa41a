"""The skinny (few-row, split-K) linear kernel vs F.linear: every split count, batch sizes that
do and do not fill a tile, and the same result run to run (the split sum has a fixed order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from radixrt.kernels.skinny_gemm import SkinnyConfig, fits, skinny_linear  # noqa: E402
from tests.kernels.conftest import TOL, rel_err  # noqa: E402


@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skinny_linear_matches_torch(device, dtype, split_k):
    if device == "cuda":
        cfg = SkinnyConfig(block_n=64, block_k=128, split_k=split_k)
        shapes = [(1, 6144, 4096), (16, 4096, 4096), (37, 28672, 4096), (256, 4096, 14336)]
    else:
        cfg = SkinnyConfig(block_n=16, block_k=16, split_k=split_k, num_warps=1, num_stages=1)
        shapes = [(1, 40, 64), (5, 32, 128), (17, 24, 64)]  # N not a multiple of BLOCK_N too
    for m, n, k in shapes:
        assert fits(m, n, k, cfg)
        x = torch.randn(m, k, device=device).to(dtype)
        w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
        out = skinny_linear(x, w, cfg)
        ref = F.linear(x.double(), w.double())
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], (m, n, k)
        assert torch.equal(skinny_linear(x, w, cfg), out), "not deterministic run to run"


def test_configs_that_would_mask_k_are_refused():
    cfg = SkinnyConfig(block_n=64, block_k=128, split_k=4)
    assert fits(16, 4096, 4096, cfg) and not fits(16, 4096, 4096 + 128, cfg)
    assert not fits(0, 4096, 4096, cfg) and not fits(257, 4096, 4096, cfg)
