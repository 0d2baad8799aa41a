"""radixrt: LLM serving with a radix-tree prefix cache over a paged KV pool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from radixrt.config import EngineConfig
    from radixrt.engine.engine import CompletionOutput, Engine, RequestOutput
    from radixrt.sampling_params import SamplingParams

__all__ = ["CompletionOutput", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

_LAZY = {
    "Engine": "radixrt.engine.engine",
    "RequestOutput": "radixrt.engine.engine",
    "CompletionOutput": "radixrt.engine.engine",
    "EngineConfig": "radixrt.config",
    "SamplingParams": "radixrt.sampling_params",
}


def __getattr__(name: str) -> Any:
    # Lazy, so light processes (the HTTP router) don't import the model stack.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'radixrt' has no attribute {name!r}")
