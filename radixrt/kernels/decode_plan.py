"""How a decode step launches: its KV split count (``choose_num_splits`` for any context,
``choose_short_splits`` when every KV is at most SHORT_CONTEXT long) and stage 1's tile
(``decode_launch``). Host-side integers only: each depends on the batch size and the context
class, so one CUDA graph per (batch size, variant) keeps a fixed launch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


def decode_block_n(device: torch.device) -> int:
    return 64 if device.type == "cuda" else 16


@dataclass(frozen=True)
class DecodeLaunch:
    """Stage 1's KV tile (positions per iteration) and its launch settings."""

    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        assert self.block_n >= 16 and self.block_n & (self.block_n - 1) == 0, (
            f"block_n {self.block_n} must be a power of two >= 16 (the dot's minimum)"
        )
        assert self.num_warps in (1, 2, 4, 8) and self.num_stages >= 1, f"bad launch {self}"


# One-split launches by (request, KV head) programs per SM, measured on an H200 in CUDA graphs
# (bench/RESULTS.md, session 10; decode_tile_probe.py): (up to this many programs per SM, launch).
#   up to 1: a 128-position tile (16 x 512: 9.5 vs 10.7 us at 64); up to 2: the 64-position default;
#   a 32-position, 2-warp tile from 2 on, since it fits 4 (3 stages) or 7 (2 stages) programs in
#   an SM at once (64 x 512: 40.3 -> 35.8 us). Stages by the wave count the probe favoured:
#   2 at 1,024 and 2,048 programs (128 x 1024: 127.7 vs 141.9 us), 3 at 1,536 (192 x 1024: 190.2
#   vs 209.9).
ONE_SPLIT_LAUNCHES = (
    (1.0, (128, 4, 3)), (2.0, (64, 4, 3)), (6.0, (32, 2, 3)), (10.0, (32, 2, 2)),
    (14.0, (32, 2, 3)), (float("inf"), (32, 2, 2)),
)


def decode_launch(batch_size: int, num_kv_heads: int, num_sms: int, num_splits: int,
                  device: torch.device) -> DecodeLaunch:
    """Stage 1's launch for a step of ``batch_size`` requests in ``num_splits`` splits: how many
    programs an SM holds at once, and so how many waves a step takes, decides one-split steps
    (ONE_SPLIT_LAUNCHES); split steps keep the 64-position, 4-warp, 3-stage default."""
    if device.type != "cuda":
        return DecodeLaunch(decode_block_n(device), 1, 1)
    if num_splits > 1:
        return DecodeLaunch(64, 4, 3)
    per_sm = batch_size * num_kv_heads / max(1, num_sms)
    for bound, launch in ONE_SPLIT_LAUNCHES:
        if per_sm <= bound:
            return DecodeLaunch(*launch)
    raise AssertionError("ONE_SPLIT_LAUNCHES ends at infinity")


# Decode steps whose longest KV is at most this many tokens take choose_short_splits.
SHORT_CONTEXT = 2048


def choose_short_splits(batch_size: int, num_kv_heads: int, num_sms: int, max_splits: int,
                        min_split_len: int) -> int:
    """Splits for a decode step whose every KV is at most SHORT_CONTEXT long: about one
    (request, KV head, split) program per SM, and no more splits than SHORT_CONTEXT /
    min_split_len could fill. Splits past a request's KV exit at once, but not for free: on an
    H200 (bench/RESULTS.md, session 8) 64 x 256 ran in 26.0 us at 1 split vs 30.9 at
    choose_num_splits' 5, 32 x 1024 in 38.1 vs 43.0 at 9, 16 x 512 in 10.5 at 2 vs 13.9 at 17."""
    # Nearest, not ceiling: 16 x 8 = 128 programs on 132 SMs run best in one split (6.6 us at
    # 16 x 256 on an H200, vs 8.5 at two; session 10), since a split adds the merge launch.
    want = round(num_sms / max(1, batch_size * num_kv_heads))
    return max(1, min(max_splits, want, triton.cdiv(SHORT_CONTEXT, min_split_len)))


def choose_num_splits(batch_size: int, num_kv_heads: int, num_sms: int, max_splits: int) -> int:
    """Enough (request, KV head, split) programs to give every SM several; batch-size only, so a
    CUDA graph captured per batch size keeps a fixed grid."""
    # ~16 programs per SM: several resident at once and enough waves that the last partial
    # wave costs little.
    target_programs = 16 * num_sms
    want = triton.cdiv(target_programs, max(1, batch_size * num_kv_heads))
    return max(1, min(max_splits, want))
