"""The host-side shapes of cascade decode (kernels/cascade_decode.py): one step's device metadata
(``CascadeMeta``, built by attention/cascade_plan.py) and the pass-1 tile geometry
(``PrefixTiling``, fixed per backend)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

ITEM_FIELDS = 5  # per pass-1 item: page-table row, kv start, kv end, first member, member count


@dataclass(frozen=True)
class CascadeMeta:
    """Device views of one step's cascade metadata (see ``cascade_plan.py``)."""

    num_items: torch.Tensor  # [2] int32: all items, items of small tiles (listed first)
    items: torch.Tensor  # [item_cap, ITEM_FIELDS] int32
    members: torch.Tensor  # [M] int32 batch index of each tile member, tile by tile
    kv_starts: torch.Tensor  # [B] int32 first position of the request's own suffix (0: no group)
    first_item: torch.Tensor  # [B] int32
    item_count: torch.Tensor  # [B] int32 (0: not in a group)
    slot: torch.Tensor  # [B] int32 the request's place in its tile

    def __post_init__(self) -> None:
        b = self.kv_starts.shape[0]
        assert self.items.dim() == 2 and self.items.shape[1] == ITEM_FIELDS, "items [cap, 5]"
        assert self.items.is_contiguous(), "items must be contiguous"
        for t in (self.first_item, self.item_count, self.slot):
            assert t.shape == (b,), "per-request metadata disagree in length"
        for t in (self.num_items, self.items, self.members, self.kv_starts, self.first_item,
                  self.item_count, self.slot):
            assert t.dtype == torch.int32 and t.stride(-1) == 1, "metadata is contiguous int32"


@dataclass(frozen=True)
class PrefixTiling:
    """Pass-1 tile geometry, fixed per backend (the plan builder sizes tiles with it).

    Two tile classes share one launch: big tiles (up to ``tile_reqs`` members, ``block_m``
    rows) and small ones (up to ``small_reqs`` members, ``small_m`` rows) for groups too small
    to fill a big tile, so a group of 4 at GQA 4 scores 16 rows, not 64 of which 48 are
    padding (4x the tensor-core work per KV tile). ``small_m == block_m``: one class."""

    block_m: int  # rows of a big tile (power of two >= 16)
    tile_reqs: int  # requests per big tile: block_m // GROUP (at least 1)
    max_items: int  # most KV chunks one tile may be split into (power of two)
    small_m: int = 0  # rows of a small tile (0: block_m, no small class)
    small_reqs: int = 0  # requests per small tile (0: no small class)

    @staticmethod
    def make(group: int, device: torch.device, tile_reqs: int | None = None,
             max_items: int = 16, small_tiles: bool = True) -> PrefixTiling:
        if tile_reqs is None:
            tile_reqs = 16 if device.type == "cuda" else 4
        block_m = max(16, triton.next_power_of_2(group * tile_reqs))
        block_m = min(block_m, max(128, triton.next_power_of_2(group)))
        big_reqs = max(1, min(tile_reqs, block_m // group))
        small_m = max(16, triton.next_power_of_2(group))
        small_reqs = small_m // group if small_tiles and small_m < block_m else 0
        if small_reqs == 0 or small_reqs >= big_reqs:
            small_m, small_reqs = block_m, 0
        return PrefixTiling(block_m, big_reqs, max_items, small_m, small_reqs)

    def __post_init__(self) -> None:
        assert self.block_m >= 16 and self.block_m & (self.block_m - 1) == 0, "block_m 2^k >= 16"
        assert self.tile_reqs >= 1 and self.max_items & (self.max_items - 1) == 0, "bad tiling"
        if self.small_m == 0:
            object.__setattr__(self, "small_m", self.block_m)
        assert 16 <= self.small_m <= self.block_m and self.small_m & (self.small_m - 1) == 0
        assert (self.small_reqs == 0) == (self.small_m == self.block_m), "small class half set"
