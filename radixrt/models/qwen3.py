"""Qwen3 (dense): the Llama decoder plus a per-head RMSNorm on q and k (over head_dim, before
RoPE), no projection bias, and a head_dim that need not equal hidden / heads."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from radixrt.models.args import ModelArgs
from radixrt.models.layers import Device, RMSNorm
from radixrt.models.llama import LlamaAttention, LlamaForCausalLM

if TYPE_CHECKING:
    from radixrt.distributed.group import TPGroup


class Qwen3Attention(LlamaAttention):
    def __init__(self, args: ModelArgs, layer_id: int, *, dtype: torch.dtype, device: Device,
                 tp: TPGroup | None = None):
        super().__init__(args, layer_id, dtype=dtype, device=device, tp=tp)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, dtype=dtype, device=device)
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, dtype=dtype, device=device)

    def qk_transform(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q[T,Hq,D], k[T,Hkv,D]: flatten heads into rows so the 2-D norm kernel applies per head.
        d = self.head_dim
        q = self.q_norm(q.reshape(-1, d)).view(q.shape)
        k = self.k_norm(k.reshape(-1, d)).view(k.shape)
        return q, k


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls: ClassVar[type[LlamaAttention]] = Qwen3Attention

    def __init__(
        self, args: ModelArgs, *, dtype: torch.dtype = torch.float32, device: Device = "cpu",
        tp: TPGroup | None = None,
    ):
        if not args.qk_norm:
            raise ValueError("Qwen3 needs qk_norm=True")
        super().__init__(args, dtype=dtype, device=device, tp=tp)
