"""Split-KV decode attention over the paged pool vs the torch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from radixrt.attention.torch_ref import paged_attention_reference  # noqa: E402
from radixrt.kernels.decode_attention import decode_attention, decode_partials  # noqa: E402
from radixrt.kernels.decode_plan import decode_block_n  # noqa: E402


def _run(paged_case, assert_close, device, seq_lens, heads, kv_heads, head_dim, page_size,
         dtype, num_splits, min_split_len):  # fmt: skip
    case = paged_case(
        prefix_lens=[s - 1 for s in seq_lens],
        extend_lens=[1] * len(seq_lens),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        device=device,
    )
    b, scale = case.batch, head_dim**-0.5
    rows = len(seq_lens) * heads * num_splits
    # Poisoned partials: stage 2 must only read splits stage 1 wrote.
    part_out = torch.full((rows * head_dim,), float("nan"), device=device)
    part_lse = torch.full((rows,), float("nan"), device=device)
    out = torch.full_like(case.q, float("nan"))
    decode_attention(
        case.q, case.k_flat, case.v_flat, b.seq_lens, b.page_table, b.req_rows, b.page_size, scale,
        num_splits, part_out, part_lse, out=out, min_split_len=min_split_len,
    )  # fmt: skip
    ref = paged_attention_reference(case.q, case.k_flat, case.v_flat, b, scale)
    assert_close(out, ref)
    return b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 16), (8, 2, 64)])
def test_decode_matches_reference(
    paged_case, assert_close, device, heads, kv_heads, head_dim, page_size, dtype
):
    # Lengths: 1 (a fresh request), shorter than one split, several splits, last split partial.
    seq_lens, num_splits, min_split = [1, 13, 130, 70], 5, decode_block_n(torch.device(device))
    if device == "cuda":
        heads, kv_heads = heads * 4, kv_heads * 4
        seq_lens, num_splits, min_split = [1, 300, 5000, 17, 2049], 16, 256
    _run(paged_case, assert_close, device, seq_lens, heads, kv_heads, head_dim, page_size,
         dtype, num_splits, min_split)  # fmt: skip


def test_decode_split_count_does_not_change_result(paged_case, assert_close, device):
    """One split (no reduction) and many splits agree with the reference alike."""
    for num_splits in (1, 3, 8):
        _run(paged_case, assert_close, device, [97, 40], 4, 1, 32, 4, torch.float32,
             num_splits, 16)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("seq_lens", [[32768] * 2 + [8191, 1], [32768, 4096, 1000, 31]])
def test_decode_long_context_8b(paged_case, assert_close, device, seq_lens, page_size):
    """8B-like decode: 32 query heads over 8 KV heads, head_dim 128, bf16, up to 32k tokens."""
    _run(paged_case, assert_close, device, seq_lens, 32, 8, 128, page_size, torch.bfloat16,
         32, 256)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(32, 32, 128), (16, 2, 64), (8, 8, 96)]
)
def test_decode_real_shapes(paged_case, assert_close, device, heads, kv_heads, head_dim, dtype):
    _run(paged_case, assert_close, device, [4000, 1, 257, 1024], heads, kv_heads, head_dim, 16,
         dtype, 8, 256)  # fmt: skip


@pytest.mark.parametrize("block_n", [None, 32])
def test_one_split_writes_the_merge_output_bit_for_bit(paged_case, device, block_n):
    """With one split, stage 1 writes the output itself (no merge launch): the same bits as the
    two-launch path, and zeros (not NaN) for a padded request whose seq_len is 0, as a captured
    graph's padding rows are."""
    seq_lens = [97, 40, 1, 130]
    case = paged_case(prefix_lens=[s - 1 for s in seq_lens], extend_lens=[1] * len(seq_lens),
                      num_heads=8, num_kv_heads=2, head_dim=32, page_size=16,
                      dtype=torch.bfloat16, device=device)
    b = case.batch
    padded_lens = b.seq_lens.clone()
    padded_lens[2] = 0
    part_out = torch.empty(len(seq_lens) * 8 * 32, device=device)
    part_lse = torch.empty(len(seq_lens) * 8, device=device)
    outs = []
    for direct in (True, False):
        out = torch.full_like(case.q, float("nan"))
        decode_attention(case.q, case.k_flat, case.v_flat, padded_lens, b.page_table, b.req_rows,
                         b.page_size, 32**-0.5, 1, part_out, part_lse, out=out,
                         min_split_len=16, direct_single_split=direct)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]), "the direct one-split output differs from the merge's"
    assert torch.count_nonzero(outs[0][2]) == 0, "a padded request's row must be zeros"
    assert not torch.isnan(outs[0]).any(), "every row must be written"
    if block_n is not None:  # a non-default tile: same answer up to the tile's summation order
        out = torch.full_like(case.q, float("nan"))
        decode_partials(case.q, case.k_flat, case.v_flat, padded_lens, b.page_table, b.req_rows,
                        b.page_size, 32**-0.5, 1, part_out, part_lse, block_n=block_n,
                        direct_out=out)
        torch.testing.assert_close(out.float(), outs[0].float(), atol=2e-2, rtol=2e-2)
