"""store_kv writes each new token's K/V rows to its slot, cast to the pool dtype, and nothing else."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from radixrt.kernels.store_kv import store_kv  # noqa: E402


def assert_same_rows(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.device.type == "cpu" and got.dtype == torch.bfloat16:
        # Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest:
        # allow one bf16 ulp there; the compiled kernel must match exactly.
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0, msg=what)
    else:
        assert torch.equal(got, want), what


@pytest.mark.parametrize(
    ("in_dtype", "pool_dtype"),
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
     (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
@pytest.mark.parametrize(("kv_heads", "head_dim"), [(2, 16), (3, 24)])
def test_store_kv_writes_cast_rows(device, in_dtype, pool_dtype, kv_heads, head_dim):
    if device == "cuda":
        kv_heads, head_dim = kv_heads * 4, head_dim * 4
    num_slots, tokens = 97, 13
    k_pool = torch.randn(num_slots, kv_heads, head_dim, device=device).to(pool_dtype)
    v_pool = torch.randn(num_slots, kv_heads, head_dim, device=device).to(pool_dtype)
    k_before, v_before = k_pool.clone(), v_pool.clone()
    slots = torch.randperm(num_slots, device=device)[:tokens]
    # Non-contiguous inputs, as when K and V are slices of a fused QKV projection.
    kv = torch.randn(tokens, 2 * kv_heads, head_dim, device=device).to(in_dtype)
    k, v = kv[:, :kv_heads], kv[:, kv_heads:]
    store_kv(k_pool, v_pool, slots, k, v)
    assert_same_rows(k_pool[slots], k.to(pool_dtype), "K rows differ from the cast input")
    assert_same_rows(v_pool[slots], v.to(pool_dtype), "V rows differ from the cast input")
    untouched = torch.ones(num_slots, dtype=torch.bool, device=device)
    untouched[slots] = False
    assert torch.equal(k_pool[untouched], k_before[untouched]), "K written outside its slots"
    assert torch.equal(v_pool[untouched], v_before[untouched]), "V written outside its slots"
