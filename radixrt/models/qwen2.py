"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q/k/v projections (o_proj has none)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixrt.models.args import ModelArgs
from radixrt.models.layers import Device
from radixrt.models.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from radixrt.distributed.group import TPGroup


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(
        self, args: ModelArgs, *, dtype: torch.dtype = torch.float32, device: Device = "cpu",
        tp: TPGroup | None = None,
    ):
        if not args.attention_bias:
            raise ValueError("Qwen2 needs attention_bias=True (its qkv projections carry a bias)")
        super().__init__(args, dtype=dtype, device=device, tp=tp)
