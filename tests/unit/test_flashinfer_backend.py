"""The FlashInfer backend: its page lists and cascade layout (checkable without FlashInfer,
against the page table, the Triton cascade plan and an fp32 reference), its graph hooks and
selection errors; where FlashInfer and a GPU exist, its decode (eager and CUDA graph), cascade
and prefill against our Triton kernels and the torch reference."""

from __future__ import annotations

import dataclasses
import importlib.util
import random

import numpy as np
import pytest
import torch

from radixrt.attention.flashinfer_plan import (
    CascadeLayout,
    PagedLevel,
    PinnedRing,
    cascade_layout,
    decode_level,
    gather_pages,
    padded_cascade_layout,
    stage_level,
)
from radixrt.attention.torch_ref import TorchReferenceBackend, gather_slots, paged_decode_reference
from radixrt.cache.kv_pool import KVPool
from radixrt.engine.batch import ForwardBatch, build_forward_batch
from radixrt.engine.cascade_groups import CascadeGroups, CascadePolicy

HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None


def _random_batch(rng: random.Random, page_size: int, num_pages: int, decode: bool,
                  device: str = "cpu") -> ForwardBatch:
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


def _grouped_batch(rng: random.Random, page_size: int, groups: list[tuple[int, int]],
                   ungrouped: int, own: tuple[int, int], device: str = "cpu") -> ForwardBatch:
    """A decode batch where group g's ``members`` requests share ``shared`` tokens (the same
    pages; ``shared`` need not be page-aligned: the pages holding it are common), plus
    ``ungrouped`` lone requests; requests interleaved, pages shuffled. ``.cascade`` is set."""
    tables, lens, owner, next_page = [], [], [], 1
    for g, (shared, count) in enumerate([*groups, *[(0, 1)] * ungrouped]):
        common = list(range(next_page, next_page + shared // page_size))
        next_page += len(common)
        for _ in range(count):
            n = shared + rng.randrange(*own)  # the shared part's partial page is private
            extra = -(-n // page_size) - len(common)
            tables.append(common + list(range(next_page, next_page + extra)))
            next_page += extra
            lens.append(n)
            owner.append(g)
    perm = list(range(len(tables)))
    rng.shuffle(perm)
    shuffle = list(range(1, next_page))
    rng.shuffle(shuffle)
    tables = [[shuffle[p - 1] for p in tables[i]] for i in perm]
    batch = build_forward_batch(new_token_ids=[[1]] * len(perm),
                                prefix_lens=[lens[i] - 1 for i in perm], page_tables=tables,
                                page_size=page_size, device=device)
    members = [[pos for pos, i in enumerate(perm) if owner[i] == g] for g in range(len(groups))]
    batch.cascade = CascadeGroups.of([(s, m) for (s, _), m in zip(groups, members)],
                                     batch.req_rows_cpu)
    return batch


def _host(batch: ForwardBatch) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(batch.seq_lens_cpu), np.asarray(batch.req_rows_cpu)


def _level_slots(level: PagedLevel, batch: ForwardBatch) -> list[torch.Tensor]:
    """Each entry's flat pool slots, through the gathered page ids and last_page_len."""
    ps = batch.page_size
    ids = gather_pages(batch.page_table, torch.as_tensor(level.rows),
                       torch.as_tensor(level.first_page), torch.as_tensor(level.kv_indptr),
                       level.total_pages).long()
    out = []
    for e in range(level.size):
        pages = ids[level.kv_indptr[e] : level.kv_indptr[e + 1]]
        n = (pages.numel() - 1) * ps + int(level.last_page_len[e])
        pos = torch.arange(n)
        out.append(pages[pos // ps] * ps + pos % ps)
    return out


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_decode_level_addresses_the_same_slots_as_the_page_table(page_size):
    rng = random.Random(page_size)
    for _ in range(20):
        batch = _random_batch(rng, page_size, 400, decode=rng.random() < 0.5)
        level = decode_level(*_host(batch), page_size)
        assert level.kv_indptr[0] == 0 and level.size == batch.batch_size
        assert bool(((level.last_page_len >= 1) & (level.last_page_len <= page_size)).all())
        for i, slots in enumerate(_level_slots(level, batch)):
            row = batch.page_table[batch.req_rows_cpu[i]]
            assert torch.equal(slots, gather_slots(row, batch.seq_lens_cpu[i], page_size))


def test_staged_level_matches_the_host_lists():
    batch = _random_batch(random.Random(3), 4, 200, decode=True)
    level = decode_level(*_host(batch), 4)
    staged = stage_level(level, PinnedRing(256, torch.device("cpu")), batch.page_table)
    assert staged.kv_indptr.tolist() == level.kv_indptr.tolist()
    assert staged.last_page_len.tolist() == level.last_page_len.tolist()
    assert staged.kv_indices.dtype == torch.int32 and staged.kv_indices.numel() == level.total_pages


def test_pinned_ring_refuses_more_than_it_holds():
    ring = PinnedRing(8, torch.device("cpu"))
    ring.begin()
    assert ring.put([1, 2, 3]).tolist() == [1, 2, 3]
    with pytest.raises(AssertionError, match="holds 8"):
        ring.put(list(range(6)))


def _check_layout_covers_each_request(layout: CascadeLayout, batch: ForwardBatch) -> None:
    """Permuted positions cover the batch once; a grouped request's shared + own slots (and an
    ungrouped one's own slots) are exactly its KV."""
    assert sorted(layout.order.tolist()) == list(range(batch.batch_size))
    shared = _level_slots(layout.shared, batch)
    own = _level_slots(layout.own, batch)
    group_of = np.repeat(np.arange(layout.shared.size), np.diff(layout.qo_indptr))
    for pos, b in enumerate(layout.order.tolist()):
        prefix = shared[group_of[pos]] if pos < layout.num_grouped else torch.zeros(0).long()
        row = batch.page_table[batch.req_rows_cpu[b]]
        expect = gather_slots(row, batch.seq_lens_cpu[b], batch.page_size)
        assert torch.equal(torch.cat([prefix, own[pos]]), expect), f"request {b}"


@pytest.mark.parametrize("page_size", [1, 16])
def test_cascade_layout_agrees_with_the_triton_cascade_plan(page_size):
    from radixrt.attention.cascade_plan import ItemBudget, meta_views, pack_cascade
    from radixrt.kernels.cascade_meta import PrefixTiling

    rng = random.Random(page_size)
    shared = [4 * page_size * rng.randrange(2, 9) for _ in range(3)]
    batch = _grouped_batch(rng, page_size, [(s, rng.randrange(2, 6)) for s in shared], 3,
                           (1, 3 * page_size))
    groups = batch.cascade
    assert groups is not None
    layout = cascade_layout(groups, *_host(batch), page_size)
    assert layout is not None and layout.num_groups == groups.num_groups
    _check_layout_covers_each_request(layout, batch)
    tiling = PrefixTiling.make(4, torch.device("cpu"), 4)
    budget = ItemBudget(item_target=64, item_cap=256, min_chunk=page_size, block_n=page_size)
    packed = pack_cascade(groups, batch.batch_size, tiling, budget, batch.batch_size)
    meta = meta_views(torch.as_tensor(packed), budget.item_cap, batch.batch_size,
                      batch.batch_size)
    # Own ranges: where Triton's suffix pass starts each request (0 when ungrouped) to its end.
    own = layout.own.token_ranges(page_size)
    for pos, b in enumerate(layout.order.tolist()):
        assert own[pos] == (batch.req_rows_cpu[b], int(meta.kv_starts[b]), batch.seq_lens_cpu[b])
    # Shared ranges: Triton's items of each group's tiles cover [0, L) of the same row.
    items = meta.items[: int(meta.num_items[0])].tolist()  # (row, start, end, first, count)
    for g, (row, start, end) in enumerate(layout.shared.token_ranges(page_size)):
        members = set(layout.order[layout.qo_indptr[g] : layout.qo_indptr[g + 1]].tolist())
        mine = [it for it in items if set(meta.members[it[3] : it[3] + it[4]].tolist()) <= members]
        assert {it[0] for it in mine} == {row} and start == 0
        assert sorted(members) == sorted(groups.members[groups.indptr[g]:groups.indptr[g + 1]])
        covered = sorted({(it[1], it[2]) for it in mine})
        assert covered[0][0] == 0 and covered[-1][1] == end
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_shared_lengths_are_cut_to_whole_pages_and_pageless_groups_dissolve():
    rng = random.Random(5)
    batch = _grouped_batch(rng, 16, [(40, 3), (12, 2)], 1, (1, 30))
    groups = batch.cascade
    assert groups is not None
    layout = cascade_layout(groups, *_host(batch), 16)
    assert layout is not None and layout.num_groups == 1  # 12 tokens: no whole page
    assert layout.shared.token_ranges(16)[0][1:] == (0, 32)  # 40 tokens -> 2 pages
    assert layout.num_grouped == 3
    _check_layout_covers_each_request(layout, batch)
    lone = dataclasses.replace(groups, indptr=groups.indptr[1:] - groups.indptr[1],
                               members=groups.members[groups.indptr[1]:],
                               shared_lens=groups.shared_lens[1:], rows=groups.rows[1:])
    assert cascade_layout(lone, *_host(batch), 16) is None


def test_padded_layout_covers_the_batch_with_a_fixed_entry_count():
    rng = random.Random(9)
    batch = _grouped_batch(rng, 4, [(16, 3), (8, 2)], 3, (1, 9))
    groups = batch.cascade
    assert groups is not None
    exact = cascade_layout(groups, *_host(batch), 4)
    padded = padded_cascade_layout(groups, *_host(batch), 4, num_entries=5)
    assert exact is not None and padded.num_groups == exact.num_groups == 2
    assert padded.shared.size == 5 and padded.qo_indptr.tolist() == [0, 3, 5, 5, 5, 8]
    assert padded.shared.token_ranges(4)[:2] == exact.shared.token_ranges(4)
    assert padded.shared.token_ranges(4)[2:] == [(0, 0, 1)] * 3  # scratch row 0, one token
    assert padded.order.tolist() == exact.order.tolist()
    _check_layout_covers_each_request(padded, batch)
    none = padded_cascade_layout(None, *_host(batch), 4, num_entries=2)
    assert none.num_grouped == 0 and none.qo_indptr.tolist() == [0, 0, batch.batch_size]
    assert none.own.token_ranges(4) == decode_level(*_host(batch), 4).token_ranges(4)
    with pytest.raises(AssertionError, match="no padding entry"):
        padded_cascade_layout(groups, *_host(batch), 4, num_entries=2)


def _attend(q: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention of queries [N, Hq, D] over pool slots: (out [N, Hq, D], ln-LSE [N, Hq])."""
    group = q.shape[1] // k.shape[1]
    kk = k[slots].float().repeat_interleave(group, 1)
    vv = v[slots].float().repeat_interleave(group, 1)
    s = torch.einsum("nhd,lhd->nhl", q.float(), kk) * scale
    return torch.einsum("nhl,lhd->nhd", torch.softmax(s, -1), vv), torch.logsumexp(s, -1)


@pytest.mark.parametrize("padded", [False, True])
def test_two_level_layout_merged_by_lse_equals_per_request_decode(padded):
    """Every row through its own entry and (grouped rows) its group's shared entry, merged;
    padded (graph) layouts put the ungrouped rows in a padding entry whose result is dropped."""
    rng = random.Random(11)
    heads, kv_heads, dim, ps = 8, 2, 16, 4
    batch = _grouped_batch(rng, ps, [(16, 4), (24, 3), (9, 2)], 2, (1, 13))
    assert batch.cascade is not None
    layout = (padded_cascade_layout(batch.cascade, *_host(batch), ps, num_entries=8) if padded
              else cascade_layout(batch.cascade, *_host(batch), ps))
    assert layout is not None
    slots = int(batch.page_table.max()) * ps + ps
    k, v = torch.randn(slots, kv_heads, dim), torch.randn(slots, kv_heads, dim)
    q = torch.randn(batch.batch_size, heads, dim)
    qp = q[torch.as_tensor(layout.order)]
    own_slots, shared_slots = _level_slots(layout.own, batch), _level_slots(layout.shared, batch)
    out = torch.empty_like(q)
    for pos in range(batch.batch_size):
        o, lse = _attend(qp[pos : pos + 1], own_slots[pos], k, v, dim**-0.5)
        g = int(np.searchsorted(layout.qo_indptr, pos, side="right")) - 1
        if pos < layout.num_grouped:  # the group's shared pass, merged by log-sum-exp
            o2, lse2 = _attend(qp[pos : pos + 1], shared_slots[g], k, v, dim**-0.5)
            w = torch.sigmoid(lse - lse2)[..., None]  # exp(lse) / (exp(lse) + exp(lse2))
            o = o * w + o2 * (1 - w)
        out[layout.order[pos]] = o[0]
    ref = paged_decode_reference(q, k, v, batch, dim**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_graph_cascade_workspace_covers_graph_modes_partials():
    from radixrt.attention.flashinfer_backend import (
        WORKSPACE_BYTES,
        cascade_graph_entries,
        cascade_graph_workspace,
    )

    # Room for every pair of 256 requests plus padding; 64-row tiles (16 requests x 4 heads).
    assert cascade_graph_entries(256, 2, 16) == 241 and cascade_graph_entries(8, 2, 16) == 5
    # The H200 run's overflow: 256 x 32 heads, 64-row tiles asked 268435456 bytes of fp32
    # partials (tmp_v) beyond the 128 MB default; with the LSEs beside them.
    need = 268435456 + 32 * 256 * 64 * 4
    assert cascade_graph_workspace(256, 2, 32, 8, 128, 64) >= need > WORKSPACE_BYTES
    assert cascade_graph_workspace(256, 2, 32, 8, 128, 16) < cascade_graph_workspace(
        256, 2, 32, 8, 128, 64)


@pytest.mark.skipif(HAS_FLASHINFER, reason="checks the error shown when flashinfer is missing")
@pytest.mark.parametrize("cascade", [None, CascadePolicy()])
def test_selecting_flashinfer_without_it_is_a_clear_error(cascade):
    from radixrt.engine.runner import make_attention_backend

    with pytest.raises(ValueError, match="flashinfer package"):
        make_attention_backend("flashinfer", torch.device("cpu"), num_heads=4, num_kv_heads=2,
                               head_dim=16, max_batch=8, dtype=torch.float32, cascade=cascade)


def test_config_runs_cascade_on_flashinfer_only_when_asked():
    from radixrt.config import EngineConfig
    from radixrt.engine.runner import cascade_policy

    on = EngineConfig(device="cuda", attention_backend="flashinfer", cascade_decode="on")
    assert cascade_policy(on) is not None
    assert cascade_policy(dataclasses.replace(on, cascade_decode="auto")) is None


class _RecordingBackend(TorchReferenceBackend):
    """Records what the graph runner hands a backend (no kernels run)."""

    cascade_in_cuda_graph = False

    def __init__(self) -> None:
        super().__init__(4, 2, 8, 8**-0.5, cascade=CascadePolicy())
        self.sizes: list[int] = []
        self.prepared: list[ForwardBatch] = []

    def prepare_graph_sizes(self, sizes: list[int]) -> None:
        self.sizes = list(sizes)

    def prepare(self, batch: ForwardBatch) -> None:
        self.prepared.append(batch)


class _Replay:
    def replay(self) -> None:  # the captured work; nothing to redo here
        pass


def test_graph_runner_tells_sizes_plans_from_real_lengths_and_runs_groups_eagerly():
    from radixrt.cache.device_pages import DevicePageTable
    from radixrt.engine.cuda_graph import DecodeGraphs

    pool = KVPool(num_layers=1, num_pages=64, page_size=4, num_kv_heads=2, head_dim=8,
                  dtype=torch.float32, device="cpu")
    table = DevicePageTable(num_rows=8, max_pages=16, page_size=4, device="cpu")
    backend = _RecordingBackend()
    graphs = DecodeGraphs(torch.nn.Identity(), pool, backend, max_batch=8, table=table)
    assert backend.sizes == graphs.sizes and graphs.modes == [False]
    batch = _grouped_batch(random.Random(2), 4, [(8, 2)], 1, (1, 6))
    batch = dataclasses.replace(batch, page_table=table.table)
    assert not graphs.can_run(batch)  # graphs captured (below) would still skip grouped steps
    graphs.graphs[4, False, 0], graphs.outputs[4, False, 0] = _Replay(), torch.zeros(4, 1)  # type: ignore[assignment]
    graphs.bounds[4, 0] = graphs.full_len  # one launch variant: the unbounded one
    assert graphs.can_run(dataclasses.replace(batch, cascade=None))
    graphs.run(dataclasses.replace(batch, cascade=None))
    static = backend.prepared[-1]
    assert static.batch_size == 4 and static.cascade is None
    assert static.seq_lens_cpu == batch.seq_lens_cpu + [1]  # padding row: length 1
    assert static.req_rows_cpu == batch.req_rows_cpu + [0]
    assert torch.equal(static.seq_lens.cpu(), torch.as_tensor(static.seq_lens_cpu, dtype=torch.int32))


# ---- on the GPU, with FlashInfer ------------------------------------------------------------

HQ, HKV, HD = 32, 8, 128


def _pool(num_pages: int, ps: int = 16) -> KVPool:
    pool = KVPool(num_layers=1, num_pages=num_pages, page_size=ps, num_kv_heads=HKV,
                  head_dim=HD, dtype=torch.bfloat16, device="cuda")
    pool.k(0).normal_()
    pool.v(0).normal_()
    return pool


def _triton_decode(pool: KVPool, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    from radixrt.attention.triton_backend import TritonAttentionBackend

    tri = TritonAttentionBackend(HQ, HKV, HD, HD**-0.5, device="cuda",
                                 max_batch_size=batch.batch_size)
    plain = dataclasses.replace(batch, cascade=None)
    tri.prepare(plain)
    return tri.attend(q, pool.k_flat(0), pool.v_flat(0), plain)


def _assert_bf16_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    # Both round the output (and FlashInfer its probabilities) to bf16: 2^-8 relative.
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=4e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer is not installed")
@pytest.mark.parametrize("decode", [False, True])
def test_flashinfer_matches_the_torch_reference(decode):
    from radixrt.attention.flashinfer_backend import FlashInferBackend

    pool = _pool(400)
    batch = _random_batch(random.Random(7), 16, 400, decode, device="cuda")
    q = torch.randn(batch.num_tokens, HQ, HD, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch.num_tokens, HKV, HD, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    fi = FlashInferBackend(HQ, HKV, HD, HD**-0.5, device="cuda", dtype=torch.bfloat16)
    fi.prepare(batch)
    out = fi.forward(0, q, k, v, pool, batch)
    ref = TorchReferenceBackend(HQ, HKV, HD, HD**-0.5).forward(0, q, k, v, pool, batch)
    _assert_bf16_close(out, ref)



@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer is not installed")
@pytest.mark.parametrize("graph", [False, True])
def test_flashinfer_decode_matches_triton_decode(graph):
    from radixrt.attention.flashinfer_backend import FlashInferBackend

    rng = random.Random(13)
    pool = _pool(3000)
    first = _grouped_batch(rng, 16, [(512, 8)], 24, (1, 700), device="cuda")
    second = _grouped_batch(rng, 16, [(1024, 16)], 16, (1, 900), device="cuda")
    assert first.batch_size == second.batch_size == 32
    fi = FlashInferBackend(HQ, HKV, HD, HD**-0.5, device="cuda", max_batch_size=32)
    kv = (pool.k(0), pool.v(0))
    q = torch.randn(32, HQ, HD, device="cuda", dtype=torch.bfloat16)
    if not graph:
        fi.prepare(dataclasses.replace(second, cascade=None))
        out = fi.attend(q, kv)
    else:  # captured on the first batch, replayed on the second (other lengths and pages)
        fi.prepare_graph_sizes([32])
        fi.prepare(dataclasses.replace(first, cascade=None))
        q_static = torch.zeros_like(q)
        for _ in range(2):
            fi.attend(q_static, kv)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fi.attend(q_static, kv)
        assert fi._graph_decode, "the captured step must use a cuda-graph wrapper"
        fi.prepare(dataclasses.replace(second, cascade=None))
        q_static.copy_(q)
        g.replay()
    torch.cuda.synchronize()
    _assert_bf16_close(out, _triton_decode(pool, q, second))
    ref = paged_decode_reference(q.float(), pool.k_flat(0), pool.v_flat(0), second, HD**-0.5)
    _assert_bf16_close(out, ref)



@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer is not installed")
def test_flashinfer_cascade_graph_captured_without_groups_replays_groupings():
    """As DecodeGraphs captures a grouped graph (no groups yet), then replays other steps."""
    from radixrt.attention.flashinfer_backend import FlashInferBackend

    rng = random.Random(23)
    steps = [_grouped_batch(rng, 16, [(1024, 8), (512, 16)], 8, (1, 400), device="cuda"),
             _grouped_batch(rng, 16, [(2048, 2)] * 10 + [(256, 4)], 8, (1, 200), device="cuda"),
             _grouped_batch(rng, 16, [(48, 3)], 29, (1, 900), device="cuda")]
    assert all(b.batch_size == 32 for b in steps)
    pool = _pool(max(int(b.page_table.max()) for b in steps) + 1)
    kv = (pool.k(0), pool.v(0))
    fi = FlashInferBackend(HQ, HKV, HD, HD**-0.5, device="cuda", max_batch_size=32,
                           cascade=CascadePolicy())
    fi.prepare_graph_sizes([32])
    fi.prepare(dataclasses.replace(steps[0], cascade=CascadeGroups.empty()))
    q_static = torch.zeros(32, HQ, HD, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        fi.attend(q_static, kv)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fi.attend(q_static, kv)
    for batch in steps:
        q = torch.randn(32, HQ, HD, device="cuda", dtype=torch.bfloat16)
        fi.prepare(batch)
        q_static.copy_(q)
        g.replay()
        torch.cuda.synchronize()
        _assert_bf16_close(out, _triton_decode(pool, q, batch))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer is not installed")
@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_cascade_matches_triton_per_request_decode(page_size):
    from radixrt.attention.flashinfer_backend import FlashInferBackend
    from radixrt.attention.flashinfer_cascade import FlashInferCascade

    rng = random.Random(17 + page_size)
    groups = [(1024, 8), (520, 4), (256, 3), (2000, 2)]  # 520: not page-aligned at 16
    batch = _grouped_batch(rng, page_size, groups, 5, (1, 300), device="cuda")
    pool = _pool(int(batch.page_table.max()) + 1, page_size)
    fi = FlashInferBackend(HQ, HKV, HD, HD**-0.5, device="cuda", max_batch_size=64,
                           cascade=CascadePolicy())
    q = torch.randn(batch.batch_size, HQ, HD, device="cuda", dtype=torch.bfloat16)
    fi.prepare(batch)
    assert isinstance(fi._active, FlashInferCascade)
    out = fi.attend(q, (pool.k(0), pool.v(0)))
    _assert_bf16_close(out, _triton_decode(pool, q, batch))
    ref = paged_decode_reference(q.float(), pool.k_flat(0), pool.v_flat(0), batch, HD**-0.5)
    _assert_bf16_close(out, ref)

