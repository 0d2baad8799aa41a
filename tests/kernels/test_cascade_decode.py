"""Cascade (shared-prefix) decode vs the per-request split-KV decode kernel and the torch
reference: groups whose members share the first pages of their page tables, ragged own suffixes
(an empty one too), requests in no group, tiles and items of several sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from radixrt.attention.cascade_plan import CascadeBuffers, ItemBudget, pack_cascade  # noqa: E402
from radixrt.attention.torch_ref import (  # noqa: E402
    cascade_decode_reference,
    paged_attention_reference,
)
from radixrt.engine.batch import ForwardBatch, build_forward_batch  # noqa: E402
from radixrt.engine.cascade_groups import CascadeGroups  # noqa: E402
from radixrt.kernels.cascade_decode import cascade_decode  # noqa: E402
from radixrt.kernels.cascade_meta import PrefixTiling  # noqa: E402
from radixrt.kernels.decode_attention import decode_attention  # noqa: E402
from radixrt.kernels.decode_plan import decode_block_n  # noqa: E402


def make_shared_case(
    groups: list[tuple[int, list[int]]],  # (shared pages, own suffix length of each member)
    loners: list[int],  # sequence lengths of requests in no group
    *, heads: int, kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype,
    device: str,
) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode batch whose group members share their first pages; requests are interleaved
    (a group's members are not adjacent in the batch)."""
    specs: list[tuple[list[int], int, int]] = []  # (shared pages, shared tokens, seq_len)
    next_page = 1
    for shared_pages, suffixes in groups:
        shared = list(range(next_page, next_page + shared_pages))
        next_page += shared_pages
        for s in suffixes:
            specs.append((shared, shared_pages * page_size, shared_pages * page_size + s))
    specs += [([], 0, n) for n in loners]
    order = torch.randperm(len(specs)).tolist()
    tables, seq_lens = [], []
    for i in order:
        shared, tokens, seq_len = specs[i]
        own = -(-(seq_len - tokens) // page_size)
        tables.append(shared + list(range(next_page, next_page + own)))
        next_page += own
        seq_lens.append(seq_len)
    # Pages handed out in a shuffled order: contiguous ids would hide paging bugs.
    shuffle = (torch.randperm(next_page - 1) + 1).tolist()
    tables = [[shuffle[p - 1] for p in t] for t in tables]
    batch = build_forward_batch(new_token_ids=[[1]] * len(specs), prefix_lens=[n - 1 for n in seq_lens],
                                page_tables=tables, page_size=page_size, device=device)
    where = {i: pos for pos, i in enumerate(order)}
    grouped, start = [], 0
    for shared_pages, suffixes in groups:
        members = [where[start + j] for j in range(len(suffixes))]
        grouped.append((shared_pages * page_size, members))
        start += len(suffixes)
    batch.cascade = CascadeGroups.of(grouped, batch.req_rows_cpu)
    shape = (next_page * page_size, kv_heads, head_dim)
    k = torch.randn(shape, device=device).to(dtype)
    v = torch.randn(shape, device=device).to(dtype)
    q = torch.randn(len(specs), heads, head_dim, device=device).to(dtype)
    return batch, q, k, v


def run_cascade(batch: ForwardBatch, q, k, v, *, tile_reqs: int | None = None,
                item_target: int = 8, programs: int | None = None, num_splits: int = 3,
                min_split_len: int | None = None, prefix_block_n: int | None = None,
                small_tiles: bool = True) -> torch.Tensor:
    device = q.device
    bsz, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    tiling = PrefixTiling.make(heads // kv_heads, device, tile_reqs, small_tiles=small_tiles)
    block_n = decode_block_n(device)
    chunk = prefix_block_n or block_n
    budget = ItemBudget(item_target=item_target, item_cap=max(item_target, bsz), min_chunk=chunk,
                        block_n=chunk)
    buffers = CascadeBuffers(tiling, budget, max_batch=bsz + 3, num_kv_heads=kv_heads,
                             head_dim=head_dim, device=device)
    buffers.pre_out.fill_(float("nan"))  # only rows pass 1 wrote may be read
    assert batch.cascade is not None
    meta = buffers.upload(batch.cascade, bsz)
    rows = bsz * heads * num_splits
    suf_out = torch.full((rows * head_dim,), float("nan"), device=device)
    suf_lse = torch.full((rows,), float("nan"), device=device)
    return cascade_decode(
        q, k, v, batch.seq_lens, batch.page_table, batch.req_rows, batch.page_size,
        head_dim**-0.5, meta, tiling, num_splits=num_splits,
        prefix_programs=programs or item_target, suf_out=suf_out, suf_lse=suf_lse,
        pre_out=buffers.pre_out, pre_lse=buffers.pre_lse,
        min_split_len=min_split_len or block_n, block_n=prefix_block_n,
    )  # fmt: skip


def per_request(batch: ForwardBatch, q, k, v, num_splits: int = 3) -> torch.Tensor:
    rows = q.shape[0] * q.shape[1] * num_splits
    return decode_attention(
        q, k, v, batch.seq_lens, batch.page_table, batch.req_rows, batch.page_size,
        q.shape[2] ** -0.5, num_splits, torch.empty(rows * q.shape[2], device=q.device),
        torch.empty(rows, device=q.device), min_split_len=decode_block_n(q.device),
    )  # fmt: skip


CPU_GROUPS = [
    (3, [1, 5, 17, 2]),  # 4 members, ragged suffixes
    (2, [0, 9]),  # an empty own suffix (the whole KV is shared)
    (5, [4]),  # a group of one
    (2, [1, 2, 3, 4, 5, 6, 7, 8]),  # 8 members: several tiles at tile_reqs 4
]


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"),
                         [(2, 2, 64), (8, 2, 64), (8, 1, 128)])  # GQA 1, 4, 8
def test_cascade_matches_per_request(device, assert_close, heads, kv_heads, head_dim, page_size):
    scale_pages = 1 if page_size == 16 else 8  # enough tokens to span several KV tiles
    groups = [(p * scale_pages, s) for p, s in CPU_GROUPS]
    loners = [1, 30, 70]
    if device == "cuda":
        heads, kv_heads, head_dim = heads * 4, kv_heads * 4, 128
        groups = [(p * 16, [s * 20 + 1 for s in suf]) for p, suf in groups]
        loners = [1, 3000, 700]
    batch, q, k, v = make_shared_case(groups, loners, heads=heads, kv_heads=kv_heads,
                                      head_dim=head_dim, page_size=page_size,
                                      dtype=torch.float32, device=device)
    out = run_cascade(batch, q, k, v)
    assert_close(out, per_request(batch, q, k, v))
    assert_close(out, paged_attention_reference(q, k, v, batch, head_dim**-0.5))


@pytest.mark.parametrize(("tile_reqs", "item_target", "programs"),
                         [(1, 1, 1), (2, 16, 3), (8, 4, 4)])
def test_tiles_items_and_program_loop(device, assert_close, tile_reqs, item_target, programs):
    """Tiles of one request, many items per tile with fewer programs than items (each program
    loops), one item per tile: all equal the reference."""
    batch, q, k, v = make_shared_case([(6, [3, 1, 8, 2, 5]), (4, [7, 7, 7])], [12],
                                      heads=8, kv_heads=2, head_dim=64, page_size=16,
                                      dtype=torch.float32, device=device)
    out = run_cascade(batch, q, k, v, tile_reqs=tile_reqs, item_target=item_target,
                      programs=programs)
    assert_close(out, paged_attention_reference(q, k, v, batch, 64**-0.5))


@pytest.mark.parametrize(("small_tiles", "programs"), [(True, 3), (True, 64), (False, 3)])
def test_small_and_big_tiles(device, assert_close, small_tiles, programs):
    """Groups of <= 4 members in 16-row small tiles, larger ones in 32-row big tiles (GQA 4,
    tile_reqs 8), one launch; programs fewer than items carry the item index across classes."""
    batch, q, k, v = make_shared_case(CPU_GROUPS + [(3, [2, 6, 1, 4, 3])], [9, 40], heads=8,
                                      kv_heads=2, head_dim=64, page_size=16,
                                      dtype=torch.float32, device=device)
    tiling = PrefixTiling.make(4, torch.device(device), 8, small_tiles=small_tiles)
    assert (tiling.block_m, tiling.small_m) == ((32, 16) if small_tiles else (32, 32))
    out = run_cascade(batch, q, k, v, tile_reqs=8, item_target=12, programs=programs,
                      small_tiles=small_tiles)
    assert_close(out, paged_attention_reference(q, k, v, batch, 64**-0.5))


def test_request_with_no_kv_gets_zeros(device, assert_close):
    """A padded request of a captured graph (seq_len 0, in no group) merges no part at all: its
    output is zeros, not NaN, and the other requests are unaffected."""
    batch, q, k, v = make_shared_case([(4, [3, 9])], [20, 7], heads=8, kv_heads=2, head_dim=64,
                                      page_size=16, dtype=torch.float32, device=device)
    assert batch.cascade is not None
    loner = next(b for b in range(4) if b not in set(batch.cascade.members.tolist()))
    expect = paged_attention_reference(q, k, v, batch, 64**-0.5)
    batch.seq_lens[loner] = 0
    out = run_cascade(batch, q, k, v)
    assert torch.equal(out[loner], torch.zeros_like(out[loner]))
    keep = [b for b in range(4) if b != loner]
    assert_close(out[keep], expect[keep])


def test_pack_small_tiles_first():
    """Small tiles (groups of <= small_reqs) come first and are counted in the header; a big
    group splits into big tiles; every member's items and slot point at its own tile."""
    sizes = [3, 9, 4, 6, 2]
    spec, start = [], 0
    for i, n in enumerate(sizes):
        spec.append((32 * (i + 1), list(range(start, start + n))))
        start += n
    groups = CascadeGroups.of(spec, rows=list(range(100, 100 + start)))
    tiling = PrefixTiling.make(4, torch.device("cpu"), 8)
    assert (tiling.small_reqs, tiling.tile_reqs) == (4, 8)
    budget = ItemBudget(item_target=12, item_cap=40, min_chunk=16, block_n=16)
    buf = pack_cascade(groups, start, tiling, budget, max_batch=32)
    n, n_small = int(buf[0]), int(buf[1])
    items = buf[2 : 2 + 5 * n].reshape(n, 5)
    per_req = buf[2 + 40 * 5 + 32 :].reshape(4, 32)
    small_groups = {i for i, size in enumerate(sizes) if size <= 4}
    group_of = {b: g for g, (_, m) in enumerate(spec) for b in m}
    for j, (_, s0, e0, first, count) in enumerate(items.tolist()):
        members = buf[2 + 200 + first : 2 + 200 + first + count].tolist()
        gs = {group_of[b] for b in members}
        assert len(gs) == 1 and s0 < e0 <= spec[gs.pop()][0]
        assert (group_of[members[0]] in small_groups) == (j < n_small)
        for slot, b in enumerate(members):
            assert per_req[3, b] == slot and per_req[1, b] <= j < per_req[1, b] + per_req[2, b]
    assert 0 < n_small < n
    assert sorted(c for *_, c in {tuple(it[3:]) for it in items.tolist()}) == [2, 3, 4, 4, 5, 6]


@pytest.mark.parametrize("page_size", [4, 16, 64])
def test_prefix_tiles_of_several_pages(device, assert_close, page_size):
    """Pass-1 KV tiles of 64 positions over pages of 4 (one table read per position), 16 (one
    per page, the GPU default) and 64 (one per tile), with slots read a tile ahead; shared
    lengths that end inside a tile."""
    batch, q, k, v = make_shared_case([(336 // page_size, [3, 70, 1]), (208 // page_size, [9, 2])],
                                      [33], heads=8, kv_heads=2, head_dim=64, page_size=page_size,
                                      dtype=torch.float32, device=device)
    out = run_cascade(batch, q, k, v, item_target=3, prefix_block_n=64)
    assert_close(out, paged_attention_reference(q, k, v, batch, 64**-0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cascade_half_precision(device, assert_close, dtype):
    batch, q, k, v = make_shared_case([(4, [2, 20, 9]), (3, [1, 1])], [5, 40], heads=8,
                                      kv_heads=2, head_dim=64, page_size=16, dtype=dtype,
                                      device=device)
    assert_close(run_cascade(batch, q, k, v), paged_attention_reference(q, k, v, batch, 0.125))


def test_torch_cascade_reference(device, assert_close):
    """The torch cascade path (engine CPU backend) equals plain attention."""
    batch, q, k, v = make_shared_case(CPU_GROUPS, [3, 50], heads=8, kv_heads=2, head_dim=16,
                                      page_size=4, dtype=torch.float32, device=device)
    assert_close(cascade_decode_reference(q, k, v, batch, 0.25),
                 paged_attention_reference(q, k, v, batch, 0.25))


def test_pack_cascade_layout():
    """Tiles split groups evenly, items cover each shared range exactly once, every member gets
    its tile's items and slot; requests in no group get none; too many tiles drop the rest."""
    groups = CascadeGroups.of([(64, [5, 0, 7, 2, 9]), (32, [3, 4])], rows=list(range(10, 20)))
    tiling = PrefixTiling(block_m=16, tile_reqs=2, max_items=4)
    budget = ItemBudget(item_target=9, item_cap=12, min_chunk=16, block_n=16)
    buf = pack_cascade(groups, 10, tiling, budget, max_batch=16)
    n = int(buf[0])
    assert buf[1] == 0  # no small tiles in this tiling
    items = buf[2 : 2 + 5 * n].reshape(n, 5)
    per_req = buf[2 + 12 * 5 + 16 :].reshape(4, 16)
    members = buf[2 + 60 : 2 + 60 + 7]
    assert members.tolist() == [5, 0, 7, 2, 9, 3, 4]
    tiles: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for row, s, e, first, count in items.tolist():
        assert s < e
        tiles.setdefault((first, count), []).append((s, e))
        assert row == (15 if first < 5 else 13)  # the group's first member's row
    # 5 members at 2 per tile -> 3 tiles (2, 2, 1); 2 members -> 1 tile.
    assert sorted(tiles) == [(0, 2), (2, 2), (4, 1), (5, 2)]
    for (first, count), spans in tiles.items():
        length = 64 if first < 5 else 32
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        for slot, b in enumerate(members[first : first + count].tolist()):
            assert per_req[0, b] == length and per_req[2, b] == len(spans)
            assert per_req[3, b] == slot
            item0 = per_req[1, b]
            assert [tuple(x) for x in items[item0 : item0 + len(spans), 1:3].tolist()] == spans
    for b in (1, 6, 8):  # in no group
        assert per_req[:, b].tolist() == [0, 0, 0, 0]
    small = pack_cascade(groups, 10, tiling, ItemBudget(2, 2, 16, 16), max_batch=16)
    assert small[0] == 2  # two tiles kept (one item each), the rest take the plain path
    kept = small[2 + 2 * 5 + 16 :].reshape(4, 16)[2]
    assert sorted(np.flatnonzero(kept).tolist()) == [0, 2, 5, 7]


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_cascade_8b_shape(device, assert_close, page_size):
    """Llama-3-8B decode shape, bf16: 16 groups of 16 over a 2048-token prefix + ragged suffix."""
    groups = [(2048 // page_size, [128 + (i * 37 + g * 11) % 257 for i in range(16)])
              for g in range(16)]
    batch, q, k, v = make_shared_case(groups, [1, 500], heads=32, kv_heads=8, head_dim=128,
                                      page_size=page_size, dtype=torch.bfloat16, device=device)
    out = run_cascade(batch, q, k, v, item_target=66, num_splits=2, min_split_len=256)
    assert_close(out, per_request(batch, q, k, v))
