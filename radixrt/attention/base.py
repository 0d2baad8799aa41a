"""The attention-backend interface: prepare per-step metadata once, then run each layer.

A backend owns no KV memory; it reads and writes the pool it is given. ``forward`` first stores
the step's new K/V at ``batch.out_slots`` in the layer's pool tensors, then computes causal
attention of each request's new queries over its whole KV (cached prefix + new tokens).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from radixrt.cache.kv_pool import KVPool
    from radixrt.engine.batch import ForwardBatch
    from radixrt.engine.cascade_groups import CascadePolicy


class AttentionBackend(ABC):
    # Whether a decode step can be captured in a CUDA graph (prepare() touches host state only
    # and forward() reads fixed device buffers).
    supports_cuda_graph = True
    # Set when decode steps may carry shared-prefix groups (``ForwardBatch.cascade``) for this
    # backend to read once per group; None: the step builder computes no grouping.
    cascade_policy: CascadePolicy | None = None
    # Whether decode steps carrying groups can be captured too; False: they run eagerly while
    # steps without groups keep their graphs.
    cascade_in_cuda_graph = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads (GQA)"
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    @property
    def decode_context_bounds(self) -> tuple[int, ...]:
        """Longest-KV bounds at which this backend's decode launches may change shape (a KV
        split count): decode graphs capture each batch size once per distinct
        ``decode_graph_variant`` over these bounds and an unbounded step."""
        return ()

    def decode_graph_variant(self, batch_size: int, max_seq_len: int) -> int:
        """Which launch shape a decode step of this batch size and longest KV takes (0: one)."""
        return 0

    def prepare_graph_sizes(self, sizes: list[int]) -> None:
        """Told once, before capture, which decode batch sizes get CUDA graphs (a backend with
        fixed-size per-graph state sets it up for these)."""
        return None  # most backends keep no per-size state

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None:
        """Compute whatever per-step metadata the kernels need (called once per step)."""

    @abstractmethod
    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        pool: KVPool,
        batch: ForwardBatch,
        out: torch.Tensor | None = None,  # [T, num_heads, head_dim], head_dim contiguous
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Store k/v into the pool at batch.out_slots, then attend. With ``out``, the result
        goes there and ``out`` is returned (piecewise graphs read it from a static buffer)."""


class ExtendDelegate(Protocol):
    """A backend that runs another backend's extend steps: ``prepare`` the step, then per layer
    ``attend`` over paged layer tensors ([P+1, page, Hkv, D] each) already holding its K/V."""

    def prepare(self, batch: ForwardBatch) -> None: ...

    def attend(self, q: torch.Tensor,
               kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor: ...  # [T, Hq, D]
