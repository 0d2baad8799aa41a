"""Model hyper-parameters, read once from a Hugging Face ``config.json`` dict and validated.

Two config dialects exist in the wild and both are accepted:
  * transformers <= 4.x: top-level ``rope_theta`` + optional ``rope_scaling`` dict;
  * transformers 5.x:    ``rope_parameters = {"rope_theta": ..., "rope_type": ..., ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Kept here (not derived from the registry) so args.py imports no model code; a test checks the
# registry maps exactly these names.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

# GGUF metadata names a model_type, not an architecture class.
MODEL_TYPE_TO_ARCHITECTURE: Mapping[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency scaling (the only non-default rope type supported)."""

    rope_type: str
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.rope_type != "llama3":
            raise ValueError(
                f"unsupported rope scaling type {self.rope_type!r}; supported: "
                f"{SUPPORTED_ROPE_TYPES}"
            )
        if self.factor <= 0 or self.original_max_position_embeddings <= 0:
            raise ValueError(f"bad llama3 rope scaling {self}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor: {self}"
            )

    @classmethod
    def from_hf(cls, rope: Mapping[str, Any] | None) -> RopeScaling | None:
        """Parse an HF ``rope_scaling``/``rope_parameters`` dict; None for plain RoPE."""
        if not rope:
            return None
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in (None, "default"):
            return None
        if rope_type != "llama3":
            raise ValueError(
                f"unsupported rope scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
            )
        try:
            return cls(
                rope_type="llama3",
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ValueError(f"llama3 rope scaling is missing {e.args[0]!r}: {dict(rope)}") from e


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"bad {self.rms_norm_eps=} or {self.rope_theta=}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attn_scale(self) -> float:
        return float(self.head_dim) ** -0.5

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelArgs:
        architecture = _architecture(config)
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        head_dim = config.get("head_dim") or hidden // heads
        rope_params = config.get("rope_parameters") or {}
        rope_theta = config.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = config.get("rope_scaling") or rope_params
        eos = config.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
        return cls(
            architecture=architecture,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=RopeScaling.from_hf(scaling),
            max_position_embeddings=_max_positions(config),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 configs carry no flag: its q/k/v projections always have a bias.
            attention_bias=architecture == "Qwen2ForCausalLM"
            or bool(config.get("attention_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            eos_token_ids=tuple(int(e) for e in eos_ids),
            bos_token_id=None
            if config.get("bos_token_id") is None
            else int(config["bos_token_id"]),
            torch_dtype=str(dtype).removeprefix("torch."),
        )


def _architecture(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures") or []
    if archs:
        arch = str(archs[0])
    elif config.get("model_type") in MODEL_TYPE_TO_ARCHITECTURE:
        arch = MODEL_TYPE_TO_ARCHITECTURE[str(config["model_type"])]
    else:
        raise ValueError(
            f"config names no architecture (architectures={archs!r}, "
            f"model_type={config.get('model_type')!r}); supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _max_positions(config: Mapping[str, Any]) -> int:
    max_pos = int(config.get("max_position_embeddings", 2048))
    # Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) equals full attention
    # for sequences no longer than the window, so cap the context there instead of diverging.
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", "use_sliding_window" not in config)
    if window and uses_window:
        max_pos = min(max_pos, int(window))
    return max_pos
