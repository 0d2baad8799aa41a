"""Batch-invariant GEMM and attention (deterministic inference): right numbers, and a row's
result is bitwise the same however the batch around it was formed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from radixrt.attention.torch_ref import paged_attention_reference  # noqa: E402
from radixrt.engine.batch import build_forward_batch  # noqa: E402
from radixrt.kernels.invariant_attention import (  # noqa: E402
    SplitBuffers,
    invariant_attention,
    invariant_tile,
)
from radixrt.kernels.matmul import batch_invariant_linear  # noqa: E402

# ----------------------------------------------------------------------------------- GEMM


def _shapes(device: str) -> list[tuple[int, int, int]]:
    if device == "cuda":  # Llama-3-8B projections (qkv, o, gate_up, down) and a small vocab
        return [(300, 4096, 6144), (300, 4096, 4096), (300, 4096, 28672), (300, 14336, 4096),
                (300, 4096, 32000)]
    return [(37, 48, 40), (37, 72, 80)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_torch(device, assert_close, dtype):
    for m, k, n in _shapes(device):
        x = torch.randn(m, k, dtype=dtype, device=device)
        w = torch.randn(n, k, dtype=dtype, device=device) / k**0.5
        b = torch.randn(n, dtype=dtype, device=device)
        assert_close(batch_invariant_linear(x, w), F.linear(x.float(), w.float()).to(dtype))
        assert_close(batch_invariant_linear(x, w, b), F.linear(x.float(), w.float(), b.float()).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_do_not_depend_on_the_batch(device, dtype):
    """Row i of a 300-row product equals the same row computed alone, in a batch of 7, and in
    the middle of a batch of 129 (different tile positions, different M)."""
    for m, k, n in _shapes(device):
        x = torch.randn(m, k, dtype=dtype, device=device)
        w = torch.randn(n, k, dtype=dtype, device=device) / k**0.5
        full = batch_invariant_linear(x, w)
        for lo, hi in ((5, 6), (3, 10), (100, 229), (m - 1, m)):
            part = batch_invariant_linear(x[lo:hi], w)
            assert torch.equal(part, full[lo:hi]), f"rows {lo}:{hi} of M={m} changed with the batch"


def test_linear_keeps_leading_dims_and_empty_input(device):
    w = torch.randn(24, 16, device=device)
    x = torch.randn(2, 3, 16, device=device)
    assert batch_invariant_linear(x, w).shape == (2, 3, 24)
    assert batch_invariant_linear(x[:0], w).shape == (0, 3, 24)
    with pytest.raises(AssertionError, match="does not match weight"):
        batch_invariant_linear(torch.randn(4, 8, device=device), w)


# ------------------------------------------------------------------------------ attention


def _config(device: str) -> tuple[int, int, int, int]:
    """(query heads, KV heads, head_dim, page_size)."""
    return (32, 8, 128, 16) if device == "cuda" else (8, 2, 16, 4)


def _chunks(device: str) -> list[int]:
    """KV chunk sizes to test: the smallest allowed (many merges) and a larger one."""
    block_n = invariant_tile(4, torch.device(device))[1]
    return [block_n, 4 * block_n]


class OneSequence:
    """One request's KV (random, already in a paged pool) and one query per position."""

    def __init__(self, length: int, heads: int, kv_heads: int, dim: int, page: int,
                 dtype: torch.dtype, device: str) -> None:
        self.page = page
        pages = -(-length // page)
        self.table = (torch.randperm(pages + 5)[:pages] + 1).tolist()  # scattered, page 0 unused
        slots = (pages + 6) * page
        self.k = torch.randn(slots, kv_heads, dim, dtype=dtype, device=device)
        self.v = torch.randn(slots, kv_heads, dim, dtype=dtype, device=device)
        self.q = torch.randn(length, heads, dim, dtype=dtype, device=device)
        self.device = device

    def attend(self, chunks: list[tuple[int, int]], chunk: int, split: bool = False) -> torch.Tensor:
        """Queries [start, end) of several chunks of this same sequence, batched together as
        if they were different requests sharing the pages; returns their outputs in order."""
        batch = build_forward_batch(
            new_token_ids=[[1] * (e - s) for s, e in chunks], prefix_lens=[s for s, _ in chunks],
            page_tables=[self.table] * len(chunks), page_size=self.page, device=self.device,
        )  # fmt: skip
        q = torch.cat([self.q[s:e] for s, e in chunks])
        out = torch.full_like(q, float("nan"))
        heads, kv_heads, dim = q.shape[1], self.k.shape[1], q.shape[2]
        buffers = SplitBuffers(len(chunks), kv_heads, heads // kv_heads, dim,
                               -(-len(self.q) // chunk), self.device) if split else None
        invariant_attention(q, self.k, self.v, batch.qo_indptr, batch.prefix_lens,
                            batch.page_table, batch.req_rows, self.page, batch.max_extend_len, dim**-0.5,
                            out=out, chunk=chunk, split=buffers, seq_lens=batch.seq_lens)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_reference(paged_case, assert_close, device, dtype):
    heads, kv_heads, dim, page = _config(device)
    ragged = ([0, 19, 5, 40], [7, 20, 1, 3]) if device == "cpu" else ([0, 2000, 4095, 130], [1024, 300, 1, 77])
    case = paged_case(prefix_lens=ragged[0], extend_lens=ragged[1], num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=dim, page_size=page, dtype=dtype, device=device)
    b, scale = case.batch, dim**-0.5
    ref = paged_attention_reference(case.q, case.k_flat, case.v_flat, b, scale)
    for chunk in _chunks(device):
        out = torch.full_like(case.q, float("nan"))
        invariant_attention(case.q, case.k_flat, case.v_flat, b.qo_indptr, b.prefix_lens,
                            b.page_table, b.req_rows, page, b.max_extend_len, scale, out=out, chunk=chunk)
        assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_does_not_depend_on_how_the_prompt_was_split(device, dtype):
    """The same queries computed as one prefill, as a cached prefix + suffix split at odd
    places, one token at a time (decode, with and without the KV split), and next to other
    requests give bitwise equal outputs: the property that makes cache on and cache off agree."""
    heads, kv_heads, dim, page = _config(device)
    length = 300 if device == "cuda" else 45
    seq = OneSequence(length, heads, kv_heads, dim, page, dtype, device)
    for chunk in _chunks(device):
        whole = seq.attend([(0, length)], chunk)
        assert not whole.isnan().any()
        for cut in (1, 7, page, length // 2 + 3, length - 1):
            split = seq.attend([(0, cut), (cut, length)], chunk)
            assert torch.equal(split, whole), f"prefix {cut} + suffix changed the output"
        decode_rows = [p for p in (length - 1, length // 3, chunk, chunk - 1, 0) if p < length]
        for kv_split in (False, True):
            decoded = seq.attend([(p, p + 1) for p in decode_rows], chunk, split=kv_split)
            assert torch.equal(decoded, whole[decode_rows]), (
                f"decode (kv split {kv_split}, chunk {chunk}) != the prefill rows"
            )
        mixed = seq.attend([(5, 6), (10, length), (2, 3)], chunk)
        assert torch.equal(mixed, torch.cat([whole[5:6], whole[10:], whole[2:3]])), "mixed batch"
