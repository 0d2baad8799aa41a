"""Step metadata and the torch reference attention: slots, positions, the decode fast path, and
the device page table the step builder keeps up to date (rows, incremental writes, reuse)."""

from __future__ import annotations

import random

import pytest
import torch

from radixrt.attention.torch_ref import paged_attention_reference, paged_decode_reference
from radixrt.cache.allocator import PageAllocator
from radixrt.cache.device_pages import DevicePageTable
from radixrt.cache.kv_pool import KVPool
from radixrt.cache.page_table import SequencePages
from radixrt.engine import step_builder
from radixrt.engine.batch import build_forward_batch
from radixrt.engine.request import Sequence
from radixrt.sampling_params import SamplingParams


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


@pytest.mark.parametrize("tokens", [1, 3, 5, 8])
def test_every_step_tensor_starts_16_byte_aligned(tokens):
    """An odd token count must not leave positions / slots at an odd offset of the shared
    upload buffer (Triton would compile a second, unaligned kernel variant mid-traffic)."""
    ids = [list(range(10, 10 + tokens)), [7, 8, 9]]
    batch = build_forward_batch(new_token_ids=ids, prefix_lens=[0, 4],
                                page_tables=[[1] * 2, [2, 3]], page_size=8)
    fields = ("input_ids", "positions", "out_slots", "logits_indices", "qo_indptr",
              "prefix_lens", "seq_lens", "req_rows")
    for name in fields:
        t = getattr(batch, name)
        assert t.data_ptr() % 16 == 0, f"{name} at byte offset {t.data_ptr() % 16}"
    assert batch.input_ids.tolist() == ids[0] + ids[1]
    assert batch.positions.tolist() == list(range(tokens)) + [4, 5, 6]
    assert batch.seq_lens.tolist() == [tokens, 7]
    assert batch.logits_indices.tolist() == [tokens - 1, tokens + 2]


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


# ---- the device page table, as the engine's step builder drives it ----------------------------


def _seq(rid: str, prompt: list[int], page_size: int) -> Sequence:
    return Sequence(rid=rid, index=0, prompt_ids=prompt, params=SamplingParams(max_new_tokens=64),
                    namespace=None, arrival=0, pages=SequencePages(page_size))


def _decoding(alloc: PageAllocator, rid: str, length: int, page_size: int) -> Sequence:
    """A sequence with ``length`` tokens whose newest one still needs its KV."""
    seq = _seq(rid, [3] * (length - 1), page_size)
    seq.output_ids = [4]
    seq.kv_len = length - 1
    assert seq.pages.ensure_capacity(length, alloc)
    return seq


def _advance(alloc: PageAllocator, seqs: list[Sequence]) -> None:
    for seq in seqs:  # what launch_results + the next schedule do
        seq.kv_len += 1
        seq.output_ids.append(5)
        assert seq.pages.ensure_capacity(seq.num_tokens, alloc)


def _assert_mirrored(table: DevicePageTable, seqs: list[Sequence]) -> None:
    for seq in seqs:
        n = seq.pages.num_pages
        assert table.read_row(seq.pages.row)[:n] == seq.pages.pages.tolist(), f"{seq.rid}: row out of date"


def test_decode_steps_write_only_the_pages_crossed_into():
    ps = 4
    alloc = PageAllocator(64)
    table = DevicePageTable(num_rows=8, max_pages=16, page_size=ps, device="cpu")
    # Lengths 5, 8, 6: after one step only the second (8 -> 9 tokens) needs a new page.
    seqs = [_decoding(alloc, f"s{i}", n, ps) for i, n in enumerate([5, 8, 6])]
    first = step_builder.build([(s, 1) for s in seqs], table)
    assert table.entries_written == 2 + 2 + 2, "the first step writes every page once"
    assert len({s.pages.row for s in seqs}) == 3 and 0 not in first.forward.req_rows_cpu
    _assert_mirrored(table, seqs)
    _advance(alloc, seqs)
    batch = step_builder.build([(s, 1) for s in seqs], table).forward
    assert table.entries_written == 6 + 1, "one decode step, one page crossed: one entry"
    _assert_mirrored(table, seqs)
    assert batch.positions.tolist() == [5, 8, 6]
    assert batch.out_slots.tolist() == [s.pages.slot(s.kv_len) for s in seqs]
    assert batch.page_table is table.table, "the batch reads the shared device table"
    flushes = table.flushes
    _advance(alloc, seqs)  # 6 -> 7, 9 -> 10, 7 -> 8 tokens: no page boundary
    step_builder.build([(s, 1) for s in seqs], table)
    assert table.entries_written == 7 and table.flushes == flushes, "nothing changed, nothing sent"


def test_prefix_swap_rewrites_exactly_the_swapped_entries():
    ps = 2
    alloc = PageAllocator(32)
    table = DevicePageTable(num_rows=4, max_pages=8, page_size=ps, device="cpu")
    seq = _decoding(alloc, "a", 7, ps)  # 4 pages
    step_builder.build([(seq, 1)], table)
    written = table.entries_written
    tree = alloc.alloc(2) or []  # "the tree's" copies of pages 0 and 2
    new_prefix = [tree[0], seq.pages.pages[1], tree[1]]
    seq.pages.replace_prefix_pages(new_prefix, alloc)
    step_builder.build([(seq, 1)], table)
    assert table.entries_written == written + 2, "only entries 0 and 2 changed"
    _assert_mirrored(table, [seq])


def test_rows_are_reused_after_release_and_stale_tails_are_never_read():
    """A long sequence finishes; a short one takes its row (LIFO) and inherits a row whose tail
    still holds the old pages. Attention must equal that of a fresh table."""
    ps, heads, dim = 4, 2, 8
    alloc = PageAllocator(40)
    pool = KVPool(num_layers=1, num_pages=40, page_size=ps, num_kv_heads=heads, head_dim=dim,
                  dtype=torch.float32, device="cpu")
    pool.k(0).normal_()
    pool.v(0).normal_()
    table = DevicePageTable(num_rows=2, max_pages=12, page_size=ps, device="cpu")
    long, other = _decoding(alloc, "long", 40, ps), _decoding(alloc, "other", 9, ps)
    step_builder.build([(long, 1), (other, 1)], table)
    freed_row = long.pages.row
    long.pages.release(alloc)
    assert table.num_free == 1
    short = _decoding(alloc, "short", 6, ps)
    batch = step_builder.build([(other, 1), (short, 1)], table).forward
    assert short.pages.row == freed_row, "the released row is handed out again"
    assert table.read_row(freed_row)[2:10] != [0] * 8, "its tail is stale, not cleared"
    fresh = build_forward_batch(new_token_ids=[[5], [4]], prefix_lens=[8, 5],
                                page_tables=[other.pages.pages, short.pages.pages], page_size=ps)
    q = torch.randn(2, heads, dim)
    for fn in (paged_decode_reference, paged_attention_reference):
        got = fn(q, pool.k_flat(0), pool.v_flat(0), batch, dim**-0.5)
        want = fn(q, pool.k_flat(0), pool.v_flat(0), fresh, dim**-0.5)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_forked_and_retracted_sequences_get_rows_of_their_own():
    ps = 4
    alloc = PageAllocator(32)
    table = DevicePageTable(num_rows=3, max_pages=8, page_size=ps, device="cpu")
    parent = _decoding(alloc, "p", 10, ps)
    step_builder.build([(parent, 1)], table)
    parent.kv_len += 1  # its prompt is in; now fork as memory.fork does
    child = _seq("c", parent.prompt_ids, ps)
    child.pages.adopt_prefix(parent.pages.pages[:2], alloc)
    child.pages.append_pages(alloc.alloc(1) or [])  # private copy of the partial last page
    child.kv_len = parent.kv_len
    child.output_ids = list(parent.output_ids)
    for s in (parent, child):
        s.output_ids.append(6)
        assert s.pages.ensure_capacity(s.num_tokens, alloc)
    before = table.entries_written
    step_builder.build([(parent, 1), (child, 1)], table)
    assert child.pages.row not in (0, parent.pages.row)
    assert table.entries_written == before + 3, "the child's row is written, the parent's kept"
    _assert_mirrored(table, [parent, child])
    # Retraction releases the row; the resumed sequence is bound again on its next step.
    child.pages.release(alloc)
    assert child.pages.row == 0 and table.num_free == 2
    child.pages.adopt_prefix(parent.pages.pages[:2], alloc)
    assert child.pages.ensure_capacity(child.num_tokens, alloc)
    child.kv_len = 8
    step_builder.build([(child, child.num_tokens - 8)], table)
    assert child.pages.row != 0
    _assert_mirrored(table, [parent, child])


def test_running_out_of_rows_is_a_clear_error():
    alloc = PageAllocator(8)
    table = DevicePageTable(num_rows=1, max_pages=4, page_size=4, device="cpu")
    a, b = _decoding(alloc, "a", 3, 4), _decoding(alloc, "b", 3, 4)
    with pytest.raises(AssertionError, match="all 1 rows are bound"):
        step_builder.build([(a, 1), (b, 1)], table)


def test_release_drops_entries_staged_for_the_row_but_never_flushed():
    """A step that raises between stage and flush must not let its stale writes land on the
    row's next owner."""
    alloc = PageAllocator(16)
    table = DevicePageTable(num_rows=2, max_pages=4, page_size=4, device="cpu")
    a, b = _decoding(alloc, "a", 9, 4), _decoding(alloc, "b", 5, 4)
    table.stage(a.pages)  # the step raises after this: no flush
    table.stage(b.pages)
    a.pages.release(alloc)
    assert table.flush() == b.pages.num_pages, "only b's entries are still staged"
    _assert_mirrored(table, [b])
