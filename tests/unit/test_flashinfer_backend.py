"""The FlashInfer backend's page-table conversion (checkable without FlashInfer) and, where
FlashInfer and a GPU exist, its output against the torch reference."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from radixrt.attention.flashinfer_backend import paged_kv_csr
from radixrt.attention.torch_ref import TorchReferenceBackend, gather_slots
from radixrt.cache.kv_pool import KVPool
from radixrt.engine.batch import build_forward_batch

HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None


def _random_batch(rng: random.Random, page_size: int, num_pages: int, decode: bool,
                  device: str = "cpu"):
    pages = list(range(1, num_pages + 1))
    rng.shuffle(pages)
    tables, prefixes, new, cursor = [], [], [], 0
    for _ in range(rng.randrange(1, 6)):
        prefix = rng.randrange(0, 60)
        extend = 1 if decode else rng.randrange(1, 30)
        need = -(-(prefix + extend) // page_size)
        tables.append(pages[cursor : cursor + need])
        cursor += need
        prefixes.append(prefix)
        new.append([rng.randrange(5, 100) for _ in range(extend)])
    return build_forward_batch(new_token_ids=new, prefix_lens=prefixes, page_tables=tables,
                               page_size=page_size, device=device)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_csr_page_lists_address_the_same_slots_as_the_page_table(page_size):
    rng = random.Random(page_size)
    for _ in range(20):
        batch = _random_batch(rng, page_size, 400, decode=rng.random() < 0.5)
        total = sum(-(-n // page_size) for n in batch.seq_lens_cpu)
        indptr, indices, last = paged_kv_csr(batch.page_table, batch.req_rows, batch.seq_lens,
                                             page_size, total)
        assert indptr[0] == 0 and indptr.numel() == batch.batch_size + 1
        for i, seq_len in enumerate(batch.seq_lens_cpu):
            pages = indices[indptr[i] : indptr[i + 1]].long()
            assert 1 <= int(last[i]) <= page_size
            assert (pages.numel() - 1) * page_size + int(last[i]) == seq_len
            pos = torch.arange(seq_len)
            slots = pages[pos // page_size] * page_size + pos % page_size
            row = batch.page_table[batch.req_rows_cpu[i]]
            assert torch.equal(slots, gather_slots(row, seq_len, page_size))


@pytest.mark.skipif(HAS_FLASHINFER, reason="checks the error shown when flashinfer is missing")
def test_selecting_flashinfer_without_it_is_a_clear_error():
    from radixrt.engine.runner import make_attention_backend

    with pytest.raises(ValueError, match="flashinfer package"):
        make_attention_backend("flashinfer", torch.device("cpu"), num_heads=4, num_kv_heads=2,
                               head_dim=16, max_batch=8, dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer is not installed")
@pytest.mark.parametrize("decode", [False, True])
def test_flashinfer_matches_the_torch_reference(decode):
    from radixrt.attention.flashinfer_backend import FlashInferBackend

    rng = random.Random(7)
    heads, kv_heads, dim, ps = 32, 8, 128, 16
    pool = KVPool(num_layers=1, num_pages=400, page_size=ps, num_kv_heads=kv_heads, head_dim=dim,
                  dtype=torch.bfloat16, device="cuda")
    pool.k(0).normal_()
    pool.v(0).normal_()
    batch = _random_batch(rng, ps, 400, decode, device="cuda")
    q = torch.randn(batch.num_tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch.num_tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    fi = FlashInferBackend(heads, kv_heads, dim, dim**-0.5, device="cuda", dtype=torch.bfloat16)
    fi.prepare(batch)
    out = fi.forward(0, q, k, v, pool, batch)
    ref = TorchReferenceBackend(heads, kv_heads, dim, dim**-0.5).forward(0, q, k, v, pool, batch)
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 2e-2
