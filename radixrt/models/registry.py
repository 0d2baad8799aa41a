"""HF architecture name -> model class, and the interface every model class implements."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

import torch

from radixrt.models.args import SUPPORTED_ARCHITECTURES, ModelArgs
from radixrt.models.layers import AttnFn, Device
from radixrt.models.llama import LlamaForCausalLM
from radixrt.models.qwen2 import Qwen2ForCausalLM
from radixrt.models.qwen3 import Qwen3ForCausalLM

if TYPE_CHECKING:
    from radixrt.distributed.group import TPGroup


class CausalLM(Protocol):
    """What the runner (and CUDA graph capture) relies on."""

    args: ModelArgs

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttnFn
    ) -> torch.Tensor: ...  # [T] int64, [T] int64 -> hidden [T, H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...  # [N, H] -> [N, V] fp32

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...


# Read-only so no caller can register into shared state at run time.
MODEL_REGISTRY: Mapping[str, type[LlamaForCausalLM]] = MappingProxyType(
    {
        "LlamaForCausalLM": LlamaForCausalLM,
        # Mistral (no sliding window in the supported range) is Llama math under another name.
        "MistralForCausalLM": LlamaForCausalLM,
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
        "Qwen3ForCausalLM": Qwen3ForCausalLM,
    }
)
assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES), "registry and args disagree"


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(MODEL_REGISTRY)}"
        ) from None


def build_model(
    args: ModelArgs, *, dtype: torch.dtype = torch.float32, device: Device = "cpu",
    tp: TPGroup | None = None,
) -> LlamaForCausalLM:
    """Allocate (uninitialized) parameters for ``args`` directly on ``device`` in ``dtype``;
    under ``tp`` only this rank's shard of each parallel parameter."""
    return model_class(args.architecture)(args, dtype=dtype, device=device, tp=tp)
