"""Model architectures (plain torch) and loading: HF safetensors, GGUF, dummy weights."""

from radixrt.models.args import SUPPORTED_ARCHITECTURES, ModelArgs, RopeScaling
from radixrt.models.default import default_model_path
from radixrt.models.layers import AttnFn
from radixrt.models.loader import LoadedModel, load_model
from radixrt.models.presets import PRESETS
from radixrt.models.registry import MODEL_REGISTRY, CausalLM, build_model, model_class

__all__ = [
    "MODEL_REGISTRY",
    "PRESETS",
    "SUPPORTED_ARCHITECTURES",
    "AttnFn",
    "CausalLM",
    "LoadedModel",
    "ModelArgs",
    "RopeScaling",
    "build_model",
    "default_model_path",
    "load_model",
    "model_class",
]
