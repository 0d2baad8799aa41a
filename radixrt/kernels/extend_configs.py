"""Tile configurations for the extend (prefill) attention kernel, and its split-KV policy.

A config is chosen by (padded head_dim, GQA group size, GPU major capability); the table holds
the winners of ``bench/bench_prefill.py --sweep`` (run by ``bench/gpu_prefill.sh``), and shapes
it has no entry for fall back to a rule of thumb. Split-KV is chosen from host-side sizes only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton


def _pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


@dataclass(frozen=True)
class ExtendConfig:
    """One launch shape. A tile has ``block_m`` rows: ``block_m // heads_per_tile`` query
    positions times ``heads_per_tile`` query heads of one KV head (GQA packing), so a K/V tile
    loaded once serves every packed head."""

    block_m: int
    block_n: int
    heads_per_tile: int
    num_warps: int
    num_stages: int
    page_vec: bool = True  # pages >= 16 tokens: one page-table read per page, not per key
    # New-token K/V from the forward's dense tensors (extend_newkv): TMA descriptors, else
    # plain pointer loads.
    new_kv_tma: bool = True
    # Prefix tiles on one run of consecutive pages load as one TMA box of pool rows (new_kv_tma).
    pool_tma: bool = True
    # Half of each unmasked tile's exp2 on the FMA pipe (extend_newkv._exp2_fma, rel. error 6e-6).
    exp_fma: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "heads_per_tile", "num_warps"):
            assert _pow2(getattr(self, name)), f"ExtendConfig.{name} must be a power of 2: {self}"
        assert self.block_m >= 16 and self.block_n >= 16, f"tiles below 16 rows: {self}"
        assert self.block_m % self.heads_per_tile == 0, f"heads_per_tile must divide block_m: {self}"
        assert self.block_m // self.heads_per_tile >= 1 and self.num_stages >= 1, f"bad {self}"

    @property
    def diag_n(self) -> int:
        """Key tile of the causal (diagonal) part: about one block's positions, at least 16."""
        return min(self.block_n, max(16, self.block_m // self.heads_per_tile))

    def as_tuple(self) -> tuple[int, int, int, int, int, bool, bool, bool, bool]:
        return (self.block_m, self.block_n, self.heads_per_tile, self.num_warps, self.num_stages,
                self.page_vec, self.new_kv_tma, self.pool_tma, self.exp_fma)


# (padded head_dim, group, major capability) -> winner of the H200 sweep (bench/gpu_prefill.sh).
TABLE: dict[tuple[int, int, int], ExtendConfig] = {
    # head_dim 128, GQA 4: session-5 call 2's winner (bench/recorded/h200_s5_call2: new tokens'
    # K/V by TMA; 42% / 52% / 69% of the matmul rate at 8x1024 / +1k prefix / 1x32k; two
    # programs per SM at 113 KB of shared memory).
    (128, 4, 9): ExtendConfig(64, 64, 4, 4, 3),
    # head_dim 64, GQA 4: the same run (33% / 58% at 8x1024 / 1x32k; pointer loads tied).
    (64, 4, 9): ExtendConfig(128, 64, 4, 4, 3),
}

# Extends of at least LONG_EXTEND_TOKENS new tokens per request (a long prompt's chunks) take
# LONG_TABLE's entry where there is one. Session-5 call 3 (bench/recorded/h200_s5_call3):
# 128x64, 2 stages, prefix page runs by TMA: 71% at 1x32k and at 1x8k + 24k prefix (vs 69% / 63%
# for the short entry), but 42% / 44% at 8x1024 (+1k prefix) where the short entry has 43% / 52%.
LONG_EXTEND_TOKENS = 4096  # between the measured 1,024 (short wins) and 8,192 (long wins)
LONG_TABLE: dict[tuple[int, int, int], ExtendConfig] = {
    (128, 4, 9): ExtendConfig(128, 64, 4, 4, 2, True, True, True, False),
}

# Whether extend_attention reads the new tokens' K/V from the forward's dense tensors when the
# caller passes them (extend_newkv.py), instead of back through the page table.
USE_NEW_KV = True

# Extends of at least this many tokens run new x new on torch's SDPA (extend_dense.py); None:
# never (the paged kernel does everything).
DENSE_NEW_MIN_TOKENS: int | None = None

# Batches whose every extend has at least this many tokens run whole (prefix gathered from its
# pages, then new x new and prefix parts) on torch's SDPA (extend_dense.dense_extend); None: never.
DENSE_EXTEND_MIN_TOKENS: int | None = 4096  # H200: 120k cold 9.42 s vs 10.38 s paged

INTERPRETER_CONFIG = (16, 16, 4, 1)  # (block_m, block_n, warps, stages): small numpy tiles


def packable_heads(group: int, cap: int) -> int:
    """Largest power of 2 up to ``cap`` that divides the GQA group (1: no packing)."""
    h = 1
    while h * 2 <= cap and group % (h * 2) == 0:
        h *= 2
    return h


def default_config(block_d: int, group: int, device: torch.device,
                   elem_bytes: int = 2, max_extend_len: int = 0) -> ExtendConfig:
    """The table's entry for this shape and GPU (16-bit inputs; LONG_TABLE's for extends of
    LONG_EXTEND_TOKENS or more), else a rule of thumb."""
    if device.type != "cuda":
        bm, bn, warps, stages = INTERPRETER_CONFIG
        return ExtendConfig(bm, bn, packable_heads(group, min(bm, 4)), warps, stages)
    if elem_bytes > 2:  # fp32 (tests): twice the shared memory per tile, so fewer stages
        return ExtendConfig(64, 64 if block_d <= 128 else 32, packable_heads(group, 4), 4, 2)
    major = torch.cuda.get_device_capability(device)[0]
    long_hit = LONG_TABLE.get((block_d, group, major))
    if long_hit is not None and max_extend_len >= LONG_EXTEND_TOKENS:
        return long_hit
    hit = TABLE.get((block_d, group, major))
    if hit is not None:
        return hit
    # Rules of thumb: on an H200 (bench/recorded/h200_s4_prefill1) two 4-warp programs per SM
    # beat one of 8 warps, whose warpgroups wait on each other; at head_dim 64 a 128-row tile
    # fits 4 warps without spilling.
    if block_d <= 64:
        return ExtendConfig(128, 64, packable_heads(group, 8), 4, 3)
    if block_d <= 128:  # H200 run 1's winner; 2 stages keep two programs per SM
        return ExtendConfig(128, 64, packable_heads(group, 4), 4, 2)
    return ExtendConfig(64, 32, packable_heads(group, 4), 4, 2)  # wide heads: keep registers low


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


MIN_SPLIT_KEYS = 2048  # keys per split at least: below it the merge costs more than it saves
MAX_SPLITS = 16
MAX_SCRATCH_BYTES = 512 << 20  # fp32 partial outputs of all splits


def choose_kv_splits(programs: int, max_seq_len: int | None, num_tokens: int, num_heads: int,
                     head_dim: int, num_sms: int) -> int:
    """KV splits for a launch of ``programs`` tiles: 1 unless the tiles alone leave SMs idle
    (about two programs per SM are needed to fill one) and the longest KV is long enough that
    each split still scans ``MIN_SPLIT_KEYS`` keys."""
    if max_seq_len is None or programs <= 0:
        return 1
    target = 2 * num_sms
    if programs >= target:
        return 1
    splits = min(triton.cdiv(target, programs), max_seq_len // MIN_SPLIT_KEYS, MAX_SPLITS)
    per_split = num_tokens * num_heads * (head_dim + 1) * 4
    splits = min(splits, MAX_SCRATCH_BYTES // max(per_split, 1))
    # A power of 2 (H200: 2 and 4 splits ran at 53% of the matmul rate, 3 at 41%).
    return 1 << (max(1, splits).bit_length() - 1)
