"""Step metadata and the torch reference attention: slots, positions and the decode fast path."""

from __future__ import annotations

import random

import pytest
import torch

from radixrt.attention.torch_ref import paged_attention_reference, paged_decode_reference
from radixrt.cache.kv_pool import KVPool
from radixrt.engine.batch import build_forward_batch


def test_slots_positions_and_logit_rows_follow_page_tables():
    batch = build_forward_batch(
        new_token_ids=[[11, 12, 13], [21]], prefix_lens=[2, 5], page_tables=[[3, 7], [4, 9]],
        page_size=4, logits_rows=[[0, 2], [0]],
    )
    assert batch.positions.tolist() == [2, 3, 4, 5]
    # pos 2,3 -> page 3 offsets 2,3; pos 4 -> page 7 offset 0; request 1 pos 5 -> page 9 offset 1
    assert batch.out_slots.tolist() == [3 * 4 + 2, 3 * 4 + 3, 7 * 4 + 0, 9 * 4 + 1]
    assert batch.qo_indptr.tolist() == [0, 3, 4]
    assert batch.seq_lens.tolist() == [5, 6]
    assert batch.logits_indices.tolist() == [0, 2, 3]
    assert not batch.is_decode and batch.max_extend_len == 3 and batch.max_seq_len == 6


def test_page_table_too_short_is_rejected():
    with pytest.raises(AssertionError, match="page table covers"):
        build_forward_batch(new_token_ids=[[1, 2]], prefix_lens=[7], page_tables=[[1, 2]], page_size=4)


@pytest.mark.parametrize("page_size,group", [(1, 1), (16, 4), (4, 2)])
def test_batched_decode_reference_equals_per_request_reference(page_size, group):
    rng = random.Random(page_size * 10 + group)
    kv_heads, dim = 2, 8
    pool = KVPool(num_layers=1, num_pages=256, page_size=page_size, num_kv_heads=kv_heads,
                  head_dim=dim, dtype=torch.float32, device="cpu")
    pool.k(0).normal_()
    pool.v(0).normal_()
    lens = [rng.randrange(1, 40) for _ in range(5)]
    pages = list(range(1, 257))
    rng.shuffle(pages)
    tables, cursor = [], 0
    for n in lens:
        need = -(-n // page_size)
        tables.append(pages[cursor : cursor + need])
        cursor += need
    batch = build_forward_batch(new_token_ids=[[1]] * len(lens), prefix_lens=[n - 1 for n in lens],
                                page_tables=tables, page_size=page_size)
    assert batch.is_decode
    q = torch.randn(len(lens), kv_heads * group, dim)
    fast = paged_decode_reference(q, pool.k_flat(0), pool.v_flat(0), batch, dim**-0.5)
    slow = paged_attention_reference(q, pool.k_flat(0), pool.v_flat(0), batch, dim**-0.5)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
