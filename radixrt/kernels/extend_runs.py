"""Which cached-prefix tiles of an extend can load as one TMA box of pool rows.

A BLOCK_N-key tile of a request's prefix spans ``BLOCK_N / page_size`` pages. When those page
ids form one run of consecutive ids, in any order (a fresh allocator hands pages out ascending,
the LIFO free list after a flush descending), the tile's K/V rows are one contiguous block of the
pool: one TMA load instead of a gather, its rows perhaps in another order than the keys, which no
unmasked tile minds as long as K and V rows stay paired. Runs break where an allocation wrapped
around the free list, so the decision is per tile: a pre-pass lists each request's tiles with
the run tiles first (with their first pool row) and the others after them, and the extend kernel
(``extend_newkv``) walks the first part with TMA and the rest by gather. Unmasked tiles commute,
so the order is free; on the device, no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_pt", "stride_list"])
def _prefix_tiles_kernel(
    page_table, req_rows, prefix_lens, Tiles, Rows, RunTiles, stride_pt, stride_list,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Request b's whole prefix tiles: Tiles[b, :RunTiles[b]] the run tiles (Rows: the first
    pool row of each), Tiles[b, RunTiles[b]:n_tiles] the others."""
    req = tl.program_id(0)
    page_row = page_table + tl.load(req_rows + req).to(tl.int64) * stride_pt
    n_tiles = tl.load(prefix_lens + req) // BLOCK_N
    tiles_row = Tiles + req.to(tl.int64) * stride_list
    rows_row = Rows + req.to(tl.int64) * stride_list
    offs_t = tl.arange(0, CHUNK)
    n_run = tl.full([], 0, tl.int32)
    n_other = tl.full([], 0, tl.int32)
    for t0 in range(0, n_tiles, CHUNK):
        t = t0 + offs_t
        valid = t < n_tiles
        if PAGE_SIZE >= BLOCK_N:  # a tile inside one page: always one block of rows
            page = tl.load(page_row + (t * BLOCK_N) // PAGE_SIZE, mask=valid, other=0)
            run = valid
            row = page * PAGE_SIZE + (t * BLOCK_N) % PAGE_SIZE
        else:
            PAGES: tl.constexpr = BLOCK_N // PAGE_SIZE
            pages = tl.load(page_row + t[:, None] * PAGES + tl.arange(0, PAGES)[None, :],
                            mask=valid[:, None], other=0)  # fmt: skip
            first = tl.min(pages, 1)
            run = valid & ((tl.max(pages, 1) - first) == PAGES - 1)  # ids distinct in a row
            row = first * PAGE_SIZE
        other = valid & ~run
        r = run.to(tl.int32)
        o = other.to(tl.int32)
        run_at = n_run + tl.cumsum(r, 0) - r
        other_at = n_tiles - 1 - (n_other + tl.cumsum(o, 0) - o)  # filled from the end
        tl.store(tiles_row + run_at, t, mask=run)
        tl.store(rows_row + run_at, row, mask=run)
        tl.store(tiles_row + other_at, t, mask=other)
        n_run += tl.sum(r, 0)
        n_other += tl.sum(o, 0)
    tl.store(RunTiles + req, n_run)


def prefix_tile_lists(
    page_table: torch.Tensor, req_rows: torch.Tensor, prefix_lens: torch.Tensor, page_size: int,
    block_n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(tiles [B, W], rows [B, W], run_tiles [B]) int32 as ``_prefix_tiles_kernel`` writes them;
    W bounds every prefix's tile count by the page table's width."""
    batch = req_rows.shape[0]
    width = max(1, page_table.shape[1] * page_size // block_n)
    dev = req_rows.device
    tiles = torch.empty(batch, width, dtype=torch.int32, device=dev)
    rows = torch.empty(batch, width, dtype=torch.int32, device=dev)
    run_tiles = torch.empty(batch, dtype=torch.int32, device=dev)
    _prefix_tiles_kernel[(batch,)](
        page_table, req_rows, prefix_lens, tiles, rows, run_tiles, page_table.stride(0), width,
        BLOCK_N=block_n, PAGE_SIZE=page_size, CHUNK=min(256, triton.next_power_of_2(width)),
    )  # fmt: skip
    return tiles, rows, run_tiles


class ExtendReuse:
    """What the layers of one forward share in their extend launches, owned by the attention
    backend: the prefix tile lists (they depend on the batch's page table and prefix lengths,
    not on the layer: computed by the first layer of a step, reused by the other layers) and
    the pool layers' TMA descriptors (the pool never moves: built once per layer and block).
    Each layer otherwise paid one extra kernel launch and four descriptors in an eager step.

    Tile lists are kept for one batch (its ``prefix_lens`` / ``req_rows`` tensors); ``new_step``
    (``TritonAttentionBackend.prepare``) drops them."""

    def __init__(self) -> None:
        self._tiles: dict[int, tuple[torch.Tensor, torch.Tensor,
                                     tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._descs: dict[tuple[int, tuple[int, ...], tuple[int, ...], int, str], object] = {}

    def new_step(self) -> None:
        self._tiles.clear()

    def tiles(self, page_table: torch.Tensor, req_rows: torch.Tensor, prefix_lens: torch.Tensor,
              page_size: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The batch's own tensors, not their values: a caller that skips new_step (a benchmark
        # calling one layer) still never gets another batch's lists.
        hit = self._tiles.get(block_n)
        if hit is None or hit[0] is not prefix_lens or hit[1] is not req_rows:
            hit = (prefix_lens, req_rows,
                   prefix_tile_lists(page_table, req_rows, prefix_lens, page_size, block_n))
            self._tiles[block_n] = hit
        return hit[2]

    def pool_descriptor(self, t: torch.Tensor, block_n: int) -> object:
        """``row_descriptor(t, block_n)`` of pool layer ``t``, built once."""
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), block_n, str(t.dtype))
        desc = self._descs.get(key)
        if desc is None:
            desc = self._descs[key] = row_descriptor(t, block_n)
        return desc


def row_descriptor(t: torch.Tensor, rows: int) -> object:
    """A TMA descriptor over [T, Hkv, D] tensor ``t`` seen as [T, Hkv * D], loading boxes of
    ``rows`` rows x one head's D columns."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, [t.shape[0], t.shape[1] * t.shape[2]], [t.stride(0), 1],
                            [rows, t.shape[2]])
