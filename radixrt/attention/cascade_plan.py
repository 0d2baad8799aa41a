"""Host side of cascade decode: a step's groups -> tiles -> pass-1 items, packed into one int32
buffer copied to the device in one transfer (views of it are the kernels' ``CascadeMeta``).

    group (members, shared L)   -> ceil(members / tile_reqs) tiles of near-equal size
    tile                        -> n KV chunks ("items") of the shared range, n chosen so the
                                   step's items roughly fill ``item_target`` programs per KV head
    request                     -> its tile's items (first, count), its slot in the tile, and
                                   its own suffix start L (0 and no items when not grouped)

    packed int32  [ all items, small-tile items | items (item_cap x 5) | members (max_batch) |
                    kv_starts | first_item | item_count | slot  (max_batch each) ]

Groups of at most ``tiling.small_reqs`` members get one small tile each (fewer rows, see
``PrefixTiling``); small tiles' items come first in the item list.

All numpy over groups/tiles/items; nothing loops over pages or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from radixrt.kernels.cascade_meta import ITEM_FIELDS, CascadeMeta, PrefixTiling

if TYPE_CHECKING:
    from radixrt.engine.cascade_groups import CascadeGroups


@dataclass(frozen=True)
class ItemBudget:
    item_target: int  # pass-1 programs per KV head (each loops over items)
    item_cap: int  # most items a step may have (the partial buffers' size)
    min_chunk: int  # shortest KV chunk worth its own item
    block_n: int  # chunks are whole multiples of the kernel's KV tile

    def __post_init__(self) -> None:
        assert 1 <= self.item_target <= self.item_cap, f"bad item budget {self}"
        assert self.min_chunk >= 1 and self.block_n >= 1, f"bad item budget {self}"


def _cdiv(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    return -(-a // b)  # type: ignore[no-any-return]


HEADER = 2  # all items, items of small tiles (listed first)


def packed_len(item_cap: int, max_batch: int) -> int:
    return HEADER + item_cap * ITEM_FIELDS + 5 * max_batch


def _tiles(groups: CascadeGroups, tiling: PrefixTiling, cap: int,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(group, first member position, member count) of each tile, small tiles first, at most
    ``cap`` of them (the rest take the plain path), and how many are small."""
    sizes = np.diff(groups.indptr)
    small = sizes <= tiling.small_reqs  # always False without a small class (small_reqs 0)
    ntile = np.where(small, 1, _cdiv(sizes, tiling.tile_reqs))
    tile_group = np.repeat(np.arange(sizes.shape[0]), ntile)
    tile_k = np.arange(tile_group.shape[0]) - np.repeat(np.cumsum(ntile) - ntile, ntile)
    base, rem = (sizes // ntile)[tile_group], (sizes % ntile)[tile_group]
    tile_count = base + (tile_k < rem)
    tile_first = groups.indptr[tile_group] + tile_k * base + np.minimum(tile_k, rem)
    order = np.argsort(~small[tile_group], kind="stable")[:cap]
    num_small = int(small[tile_group[order]].sum())
    return tile_group[order], tile_first[order], tile_count[order], num_small


def pack_cascade(groups: CascadeGroups, batch_size: int, tiling: PrefixTiling,
                 budget: ItemBudget, max_batch: int, out: np.ndarray | None = None) -> np.ndarray:
    """The packed buffer for one step (see the module docstring); written into ``out`` (int32,
    at least ``packed_len`` long) when given."""
    assert batch_size <= max_batch, f"batch {batch_size} > cascade buffers' {max_batch}"
    cap = budget.item_cap
    size = packed_len(cap, max_batch)
    if out is None:
        buf = np.zeros(size, dtype=np.int32)
    else:
        assert out.dtype == np.int32 and out.shape[0] >= size, "pack buffer too small"
        buf = out[:size]
        buf.fill(0)
    if groups.shared_lens.shape[0] == 0:
        return buf
    tile_group, tile_first, tile_count, num_small_tiles = _tiles(groups, tiling, cap)
    num_tiles = tile_group.shape[0]
    tile_len = groups.shared_lens[tile_group]
    # Items: one per tile, the rest of the target shared in proportion to prefix length.
    n = np.ones(num_tiles, dtype=np.int64)
    extra = budget.item_target - num_tiles
    if extra > 0:
        n += (extra * tile_len) // max(1, int(tile_len.sum()))
    n = np.maximum(1, np.minimum(np.minimum(n, tiling.max_items), _cdiv(tile_len, budget.min_chunk)))
    chunk = _cdiv(_cdiv(tile_len, n), budget.block_n) * budget.block_n
    n = _cdiv(tile_len, chunk)  # rounding up the chunk may leave fewer, never empty, items
    tile_item0 = np.cumsum(n) - n
    num_items = int(n.sum())
    assert num_items <= cap, f"{num_items} items > cap {cap}"
    item_tile = np.repeat(np.arange(num_tiles), n)
    start = (np.arange(num_items) - tile_item0[item_tile]) * chunk[item_tile]
    items = np.stack([groups.rows[tile_group][item_tile], start,
                      np.minimum(start + chunk[item_tile], tile_len[item_tile]),
                      tile_first[item_tile], tile_count[item_tile]], axis=1)
    buf[0] = num_items
    buf[1] = int(n[:num_small_tiles].sum())
    buf[HEADER : HEADER + num_items * ITEM_FIELDS] = items.reshape(-1)
    off = HEADER + cap * ITEM_FIELDS
    buf[off : off + groups.members.shape[0]] = groups.members
    # Each kept tile's members: positions tile_first .. tile_first + count - 1 of members.
    member_tile = np.repeat(np.arange(num_tiles), tile_count)
    slot = np.arange(member_tile.shape[0]) - np.repeat(np.cumsum(tile_count) - tile_count,
                                                       tile_count)
    req = groups.members[tile_first[member_tile] + slot]
    per_req = buf[off + max_batch :].reshape(4, max_batch)
    per_req[0, req] = tile_len[member_tile]
    per_req[1, req] = tile_item0[member_tile]
    per_req[2, req] = n[member_tile]
    per_req[3, req] = slot
    return buf


def _same_groups(a: CascadeGroups, b: CascadeGroups) -> bool:
    return a is b or all(np.array_equal(x, y) for x, y in (
        (a.indptr, b.indptr), (a.members, b.members), (a.shared_lens, b.shared_lens),
        (a.rows, b.rows)))


def meta_views(dev: torch.Tensor, item_cap: int, max_batch: int, batch_size: int) -> CascadeMeta:
    """Views of a device copy of a packed buffer for a batch of ``batch_size``."""
    off = HEADER + item_cap * ITEM_FIELDS
    per_req = dev[off + max_batch :].view(4, max_batch)[:, :batch_size]
    return CascadeMeta(
        num_items=dev[:HEADER], items=dev[HEADER:off].view(item_cap, ITEM_FIELDS),
        members=dev[off : off + max_batch], kv_starts=per_req[0], first_item=per_req[1],
        item_count=per_req[2], slot=per_req[3],
    )


class CascadeBuffers:
    """The device copy of the packed metadata (reused every step, so a captured graph reads
    it) and the pass-1 partials."""

    def __init__(self, tiling: PrefixTiling, budget: ItemBudget, *, max_batch: int,
                 num_kv_heads: int, head_dim: int, device: torch.device) -> None:
        self.tiling, self.budget, self.max_batch = tiling, budget, max_batch
        self.device = device
        self.packed = torch.zeros(packed_len(budget.item_cap, max_batch), dtype=torch.int32,
                                  device=device)
        rows = budget.item_cap * num_kv_heads * tiling.block_m
        self.pre_out = torch.empty(rows * head_dim, dtype=torch.float32, device=device)
        self.pre_lse = torch.empty(rows, dtype=torch.float32, device=device)
        self._last: tuple[CascadeGroups, int, ItemBudget, CascadeMeta] | None = None
        self._views: dict[tuple[int, int], CascadeMeta] = {}  # (item_cap, batch) -> views
        # Pinned staging buffers, used in turn: a copy may still be queued behind the running
        # step when the next one is planned (overlap), so a buffer is refilled only once the
        # event recorded after its copy has passed (steps ago, so this never waits in practice).
        on_cuda = device.type == "cuda"
        n = packed_len(budget.item_cap, max_batch)
        self._staging = [torch.zeros(n, dtype=torch.int32, pin_memory=on_cuda)
                         for _ in range(4 if on_cuda else 1)]
        self._copied: list[torch.cuda.Event | None] = [None] * len(self._staging)
        self._turn = 0

    def upload(self, groups: CascadeGroups, batch_size: int,
               budget: ItemBudget | None = None) -> CascadeMeta:
        """Pack and copy one step's metadata (``budget``: another item budget, benchmarks)."""
        budget = budget or self.budget
        assert budget.item_cap <= self.budget.item_cap, "budget beyond the buffers' item cap"
        last = self._last
        if (last is not None and last[1] == batch_size and last[2] == budget
                and _same_groups(last[0], groups)):
            return last[3]  # last step's groups (a follower rank gets a copy): on the device
        turn = self._turn
        self._turn = (turn + 1) % len(self._staging)
        event = self._copied[turn]
        if event is not None:
            event.synchronize()
        host = self._staging[turn]
        n = packed_len(budget.item_cap, self.max_batch)
        pack_cascade(groups, batch_size, self.tiling, budget, self.max_batch, out=host.numpy())
        dev = self.packed[:n]
        if self.device.type == "cuda":
            dev.copy_(host[:n], non_blocking=True)
            done = self._copied[turn] = event or torch.cuda.Event()
            done.record()
        else:
            dev.copy_(host[:n])
        meta = self._views.get((budget.item_cap, batch_size))
        if meta is None:  # the same views of the same buffer every step of this shape
            meta = self._views[budget.item_cap, batch_size] = meta_views(
                dev, budget.item_cap, self.max_batch, batch_size)
        self._last = (groups, batch_size, budget, meta)
        return meta
