"""Load a model: HF directory (safetensors), a .gguf file (dequantized), or dummy weights.

Weights stream straight from the checkpoint into parameters already allocated on the target
device and dtype; no transformers model is ever materialized.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from radixrt.models.args import MODEL_TYPE_TO_ARCHITECTURE, ModelArgs
from radixrt.models.llama import LlamaForCausalLM
from radixrt.models.presets import PRESETS, preset_config
from radixrt.models.registry import build_model

if TYPE_CHECKING:
    from radixrt.distributed.group import TPGroup

LoadFormat = Literal["auto", "safetensors", "gguf", "dummy"]
LOAD_FORMATS: tuple[str, ...] = ("auto", "safetensors", "gguf", "dummy")

# Dummy weights: small enough that activations stay O(1) through many bf16 layers.
DUMMY_INIT_STD = 0.02


@dataclass
class LoadedModel:
    model: LlamaForCausalLM  # eval mode, on device, in dtype, requires_grad off
    args: ModelArgs
    tokenizer: Any  # transformers tokenizer (with chat template), or None
    source: str  # what was loaded, for logs: a path or "dummy:<preset>"


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    load_format: LoadFormat = "auto",
    seed: int = 0,
    tp: TPGroup | None = None,
) -> LoadedModel:
    """``tp``: build and load only this tensor-parallel rank's shard of every parameter."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; expected one of {LOAD_FORMATS}")
    if model is None:
        # Imported here: default.py itself uses this module's GGUF reader.
        from radixrt.models.default import default_model_path

        model = default_model_path()
    if load_format == "dummy":
        return _load_dummy(str(model), dtype=dtype, device=device, seed=seed, tp=tp)

    path = Path(model).expanduser()
    if not path.exists():
        hint = " (a preset name: pass load_format='dummy')" if str(model) in PRESETS else ""
        raise FileNotFoundError(f"model path {str(path)!r} does not exist{hint}")
    is_gguf = path.is_file() and path.suffix == ".gguf"
    fmt = ("gguf" if is_gguf else "safetensors") if load_format == "auto" else load_format
    if fmt == "gguf":
        if not is_gguf:
            raise ValueError(f"load_format='gguf' needs a .gguf file, got {str(path)!r}")
        return _load_gguf(path, dtype=dtype, device=device, tp=tp)
    if not path.is_dir():
        raise ValueError(
            f"{str(path)!r} is not a model directory (config.json + *.safetensors) or a .gguf file"
        )
    return _load_safetensors_dir(path, dtype=dtype, device=device, tp=tp)


# --------------------------------------------------------------------------- HF directories


def read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in model directory {str(directory)!r}")
    with config_path.open() as f:
        config: dict[str, Any] = json.load(f)
    return config


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's files: those the shard index names, else every *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        with index.open() as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [directory / n for n in names]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {str(file)!r} named by {str(index)!r} is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {str(directory)!r}")
    return files


def iter_safetensors(
    files: list[Path], device: torch.device | str, *, lazy: bool = False
) -> Iterator[tuple[str, Any]]:
    """(name, tensor) per checkpoint entry; ``lazy``: (name, slice) where indexing the slice
    reads only the indexed part (a tensor-parallel rank reads just its shard)."""
    from safetensors import safe_open

    # safetensors cannot open onto "meta"; read on the CPU then.
    where = "cpu" if torch.device(device).type == "meta" else str(torch.device(device))
    for file in files:
        with safe_open(str(file), framework="pt", device=where) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, (f.get_slice(name) if lazy else f.get_tensor(name))


def _load_tokenizer(directory: Path) -> Any:
    if not any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None  # weights-only directory (benchmarks feed token ids)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _finish(model: LlamaForCausalLM) -> LlamaForCausalLM:
    model.eval()
    model.requires_grad_(False)
    return model


def _load_safetensors_dir(
    directory: Path, *, dtype: torch.dtype, device: torch.device | str, tp: TPGroup | None
) -> LoadedModel:
    args = ModelArgs.from_hf_config(read_config(directory))
    files = safetensors_files(directory)
    model = build_model(args, dtype=dtype, device=device, tp=tp)
    model.load_weights(iter_safetensors(files, device, lazy=tp is not None and tp.size > 1))
    return LoadedModel(_finish(model), args, _load_tokenizer(directory), str(directory))


# --------------------------------------------------------------------------- GGUF


@dataclass
class GGUFCheckpoint:
    hf_config: Any  # transformers PretrainedConfig
    config: dict[str, Any]  # HF config dict, with "architectures" filled in
    tensors: dict[str, torch.Tensor]  # HF names -> dequantized float32 tensors
    tokenizer: Any


def read_gguf(path: Path) -> GGUFCheckpoint:
    """Dequantize a GGUF file into HF-named tensors via transformers' GGUF support."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"loading {str(path)!r} needs the `gguf` package: pip install gguf "
            "(or pip install 'radixrt[gguf]')"
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    config = hf_config.to_dict()
    if not config.get("architectures"):
        arch = MODEL_TYPE_TO_ARCHITECTURE.get(str(config.get("model_type")))
        config["architectures"] = [arch] if arch else []
        hf_config.architectures = config["architectures"]
    ModelArgs.from_hf_config(config)  # fail fast, before dequantizing, on unsupported models
    # transformers maps GGUF tensor names by walking a model skeleton; "meta" allocates nothing.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return GGUFCheckpoint(hf_config, config, dict(parsed["tensors"]), tokenizer)


def _load_gguf(
    path: Path, *, dtype: torch.dtype, device: torch.device | str, tp: TPGroup | None
) -> LoadedModel:
    ckpt = read_gguf(path)
    args = ModelArgs.from_hf_config(ckpt.config)
    model = build_model(args, dtype=dtype, device=device, tp=tp)
    model.load_weights(ckpt.tensors.items())
    return LoadedModel(_finish(model), args, ckpt.tokenizer, str(path))


# --------------------------------------------------------------------------- dummy


def _load_dummy(
    model: str, *, dtype: torch.dtype, device: torch.device | str, seed: int, tp: TPGroup | None
) -> LoadedModel:
    if model in PRESETS:
        config, source = preset_config(model), f"dummy:{model}"
    else:
        directory = Path(model).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(
                f"dummy load needs a preset name or a directory with config.json, got {model!r}; "
                f"presets: {', '.join(PRESETS)}"
            )
        config, source = read_config(directory), f"dummy:{directory}"
    args = ModelArgs.from_hf_config(config)
    net = build_model(args, dtype=dtype, device=device, tp=tp)
    # Under TP each rank draws its own shard's values: dummy weights are for benchmarks only.
    init_dummy_weights(net, seed=seed + (tp.rank if tp is not None else 0))
    return LoadedModel(_finish(net), args, None, source)


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, *, seed: int, std: float = DUMMY_INIT_STD) -> None:
    """Fill parameters in place on their own device: norms = 1, everything else ~ N(0, std)."""
    params = list(model.named_parameters())
    if not params or params[0][1].device.type == "meta":
        return
    gen = torch.Generator(device=params[0][1].device).manual_seed(seed)
    for name, param in params:
        if "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=gen)
