"""Model runner: owns the model, the KV pool and the attention backend; runs one forward step."""

from __future__ import annotations

import logging

import torch

from radixrt.attention.base import AttentionBackend
from radixrt.cache.kv_pool import KVPool
from radixrt.engine.batch import ForwardBatch

logger = logging.getLogger(__name__)


def make_attention_backend(
    name: str, device: torch.device, *, num_heads: int, num_kv_heads: int, head_dim: int,
    max_batch: int,
) -> AttentionBackend:
    scale = head_dim**-0.5
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from radixrt.attention.torch_ref import TorchReferenceBackend

        return TorchReferenceBackend(num_heads, num_kv_heads, head_dim, scale)
    if name == "triton":
        from radixrt.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(num_heads, num_kv_heads, head_dim, scale)
    if name == "flashinfer":
        from radixrt.attention.flashinfer_backend import FlashInferBackend  # type: ignore[import-not-found]

        return FlashInferBackend(num_heads, num_kv_heads, head_dim, scale)  # type: ignore[no-any-return]
    raise ValueError(f"unknown attention backend {name!r}")


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: KVPool, backend: AttentionBackend) -> None:
        self.model = model
        self.pool = pool
        self.backend = backend
        self.device = pool.device

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run one step; returns float32 logits for ``batch.logits_indices`` rows: [N, vocab]."""
        self.backend.prepare(batch)
        pool, backend = self.pool, self.backend

        def attn(layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return backend.forward(layer_id, q, k, v, pool, batch)

        hidden = self.model(batch.input_ids, batch.positions, attn)  # [T, hidden]
        return self.model.compute_logits(hidden[batch.logits_indices])  # type: ignore[operator,no-any-return]
