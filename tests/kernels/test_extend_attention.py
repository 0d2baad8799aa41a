"""Extend (prefill) attention over the paged pool vs the torch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from radixrt.attention.torch_ref import paged_attention_reference  # noqa: E402
from radixrt.kernels.extend_attention import extend_attention  # noqa: E402

# (prefix_lens, extend_lens): prefixes of 0 and > 0, a single-token extend (a decode inside a
# mixed batch), extends spanning several query blocks, prefixes not aligned to any block.
TINY_RAGGED = ([0, 19, 5, 40], [7, 20, 1, 3])
REAL_RAGGED = ([0, 2000, 4095, 130, 0], [1024, 300, 1, 77, 515])


def _run(paged_case, assert_close, device, ragged, heads, kv_heads, head_dim, page_size, dtype):
    prefix_lens, extend_lens = ragged
    case = paged_case(
        prefix_lens=prefix_lens,
        extend_lens=extend_lens,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        device=device,
    )
    b, scale = case.batch, head_dim**-0.5
    out = torch.full_like(case.q, float("nan"))
    got = extend_attention(
        case.q, case.k_flat, case.v_flat, b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows,
        b.page_size, b.max_extend_len, scale, out=out,
    )  # fmt: skip
    assert got is out, "the kernel must write into the given output"
    ref = paged_attention_reference(case.q, case.k_flat, case.v_flat, b, scale)
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 16), (8, 2, 64)])
def test_extend_matches_reference(
    paged_case, assert_close, device, heads, kv_heads, head_dim, page_size, dtype
):
    ragged = TINY_RAGGED
    if device == "cuda":
        heads, kv_heads, ragged = heads * 4, kv_heads * 4, REAL_RAGGED
    _run(paged_case, assert_close, device, ragged, heads, kv_heads, head_dim, page_size, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("head_dim", "page_size", "dtype"),
    [
        (128, 1, torch.bfloat16),
        (128, 16, torch.bfloat16),
        (128, 64, torch.float16),
        (128, 16, torch.float32),
        (96, 16, torch.bfloat16),
        (64, 1, torch.float16),
        (32, 16, torch.bfloat16),
    ],
)
def test_extend_real_shapes(paged_case, assert_close, device, head_dim, page_size, dtype):
    """8B-like shapes (32 query heads over 8 KV heads); head_dim 96 exercises the padded block."""
    _run(paged_case, assert_close, device, REAL_RAGGED, 32, 8, head_dim, page_size, dtype)


def test_extend_reads_through_page_table(paged_case, device):
    """Overwriting pages no request owns (scratch page 0, spare pages) changes nothing."""
    case = paged_case(
        prefix_lens=[9, 0], extend_lens=[5, 4], num_heads=4, num_kv_heads=2, head_dim=16,
        page_size=4, dtype=torch.float32, device=device, spare_pages=4,
    )  # fmt: skip
    b = case.batch
    args = (b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows, b.page_size, b.max_extend_len,
            0.25)
    before = extend_attention(case.q, case.k_flat, case.v_flat, *args)
    owned = torch.zeros(case.k_flat.shape[0], dtype=torch.bool, device=device)
    for i, seq_len in enumerate(b.seq_lens_cpu):
        pos = torch.arange(seq_len, device=device)
        owned[b.page_table[b.req_rows_cpu[i]].long()[pos // 4] * 4 + pos % 4] = True
    case.k_flat[~owned] = 1e4
    case.v_flat[~owned] = float("nan")
    after = extend_attention(case.q, case.k_flat, case.v_flat, *args)
    assert torch.equal(before, after), "attention read KV outside the requests' pages"
