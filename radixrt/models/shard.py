"""How a model's parameters split over tensor-parallel ranks, and reading one rank's part.

    column-parallel (output rows split)   q/k/v_proj, gate/up_proj  [out, in] -> rows of this rank
    row-parallel (input columns split)    o_proj, down_proj          [out, in] -> columns; summed
                                                                     by one all-reduce after
    vocab-parallel (rows split, padded)   embed_tokens, lm_head      [V, H]    -> ceil(V/tp) rows
    replicated                            norms (incl. Qwen3 q/k norm), biases of row-parallel

KV heads: with Hkv >= tp each rank holds Hkv / tp of them; with fewer (tp % Hkv == 0) each KV
head is replicated on tp / Hkv ranks, and rank r keeps head r * Hkv // tp, the one its own q
heads (r * Hq/tp ...) are grouped with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from radixrt.models.args import ModelArgs

if TYPE_CHECKING:
    from radixrt.distributed.group import TPGroup

# (dim, start, length) of this rank's slice of a checkpoint tensor; None = the whole tensor.
Rule = tuple[int, int, int] | None

_VOCAB = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    size: int
    num_heads: int  # q heads on this rank
    num_kv_heads: int  # KV heads on this rank
    kv_head_start: int  # index of this rank's first KV head in the checkpoint
    head_dim: int
    intermediate: int  # MLP width on this rank
    vocab: int
    vocab_rows: int  # rows of each rank's vocab slice (the last one padded)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @staticmethod
    def check(args: ModelArgs, tp_size: int) -> None:
        """Raise ValueError when ``args`` cannot split over ``tp_size`` ranks."""
        hq, hkv = args.num_heads, args.num_kv_heads
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        if hq % tp_size:
            raise ValueError(f"tp_size {tp_size} must divide the {hq} attention heads")
        if hkv % tp_size and tp_size % hkv:
            raise ValueError(f"tp_size {tp_size} and the {hkv} KV heads must divide one another")
        if args.intermediate_size % tp_size:
            raise ValueError(f"tp_size {tp_size} must divide intermediate_size {args.intermediate_size}")

    @staticmethod
    def of(args: ModelArgs, tp: TPGroup | None) -> ShardPlan:
        rank, size = (tp.rank, tp.size) if tp is not None else (0, 1)
        ShardPlan.check(args, size)
        hkv = args.num_kv_heads
        if hkv >= size:
            kv_local, kv_start = hkv // size, rank * (hkv // size)
        else:
            kv_local, kv_start = 1, rank * hkv // size
        return ShardPlan(
            rank=rank, size=size, num_heads=args.num_heads // size, num_kv_heads=kv_local,
            kv_head_start=kv_start, head_dim=args.head_dim,
            intermediate=args.intermediate_size // size, vocab=args.vocab_size,
            vocab_rows=-(-args.vocab_size // size),
        )

    def is_vocab(self, name: str) -> bool:
        return self.size > 1 and name.split(".")[-2] in _VOCAB

    def rule(self, name: str) -> Rule:
        """This rank's slice of the HF-named checkpoint tensor ``name``."""
        if self.size == 1:
            return None
        proj = name.split(".")[-2]
        r = self.rank
        if proj == "q_proj":
            return 0, r * self.q_size, self.q_size
        if proj in ("k_proj", "v_proj"):
            return 0, self.kv_head_start * self.head_dim, self.kv_size
        if proj == "o_proj" and name.endswith("weight"):
            return 1, r * self.q_size, self.q_size
        if proj in ("gate_proj", "up_proj"):
            return 0, r * self.intermediate, self.intermediate
        if proj == "down_proj" and name.endswith("weight"):
            return 1, r * self.intermediate, self.intermediate
        if proj in _VOCAB:
            start = r * self.vocab_rows
            rows = min(self.vocab_rows, self.vocab - start)
            assert rows > 0, f"rank {r} gets no vocab rows ({self.vocab} over {self.size} ranks)"
            return 0, start, rows
        return None


def take_shard(weight: Any, rule: Rule) -> torch.Tensor:
    """``weight`` (a tensor, or a lazy safetensors slice that reads only what is indexed)
    narrowed by ``rule``."""
    if isinstance(weight, torch.Tensor):
        return weight if rule is None else weight.narrow(rule[0], rule[1], rule[2])
    if rule is None:
        return weight[:]  # type: ignore[no-any-return]
    dim, start, length = rule
    if dim == 0:
        return weight[start : start + length]  # type: ignore[no-any-return]
    assert dim == 1, f"shard rules split dim 0 or 1, got {dim}"
    return weight[:, start : start + length]  # type: ignore[no-any-return]
