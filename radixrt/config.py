"""Engine configuration: one small frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

SchedulePolicy = Literal["lpm", "fcfs"]
AttentionBackendName = Literal["auto", "torch", "triton", "flashinfer"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF directory, .gguf file, or preset (dummy); None = default model
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on CUDA
    load_format: Literal["auto", "safetensors", "gguf", "dummy"] = "auto"
    page_size: int = 16
    # KV pool size: an explicit token budget, else a fraction of free device memory (CUDA) or
    # a default token budget (CPU).
    kv_cache_tokens: int | None = None
    mem_fraction: float = 0.85
    # Host KV tier behind the GPU pool (pinned RAM on CUDA), in tokens: 0 = off; "auto" = on
    # CUDA 4x the GPU pool within 40% of the RAM available at start (off on CPU).
    host_kv_cache_tokens: int | Literal["auto"] = 0
    max_running_requests: int = 256
    chunked_prefill_size: int = 2048  # max prompt tokens computed for one request per step
    max_prefill_tokens: int = 8192  # max prompt tokens computed for all requests per step
    schedule_policy: SchedulePolicy = "lpm"
    enable_prefix_cache: bool = True
    attention_backend: AttentionBackendName = "auto"
    # Extend (prefill) attention of the triton backend: its own kernels, or FlashInfer's paged
    # prefill (FA3 on Hopper; needs the flashinfer package). Decode stays on Triton either way.
    # FA3 wins at 8 x 1024 but its kernels are slower on the engine's mixed steps (H200 chat
    # 1.40 vs 1.30 time / floor: bench/RESULTS.md, session 11).
    prefill_attention: Literal["triton", "flashinfer"] = "triton"
    max_context_len: int | None = None  # default: the model's max_position_embeddings
    cuda_graph_max_batch: int = 256  # decode batches up to this size replay CUDA graphs
    disable_cuda_graph: bool = False
    # Prefill and mixed steps of up to this many tokens replay piecewise CUDA graphs (the
    # layers' dense parts; attention eager between them: engine/piecewise_graph.py). 0 = off.
    # Off with tensor parallelism and deterministic inference.
    piecewise_cuda_graph_max_tokens: int = 2048
    # Launch decode step N+1 before reading step N's tokens (hides scheduling behind the GPU).
    # None = on for CUDA, off for CPU (where nothing runs asynchronously).
    overlap_schedule: bool | None = None
    seed: int = 0
    # Batch-invariant kernels (GEMM and attention): a request's tokens and logprobs never
    # depend on the prefix cache, batch composition or chunking. CUDA + Triton only; slower.
    deterministic_inference: bool = False
    # Shared-prefix (cascade) decode: requests sharing a cached prefix of at least
    # cascade_min_shared_pages pages, cascade_min_group or more of them, read it once per group
    # per step. "auto" = the engine's measured default (engine/runner.py CASCADE_AUTO_ON_CUDA).
    cascade_decode: Literal["auto", "on", "off"] = "auto"
    cascade_min_shared_pages: int = 2
    cascade_min_group: int = 2
    debug_invariants: bool = False  # check cache/pool invariants whenever the engine is idle
    # Run a few synthetic requests at start so kernels compile before traffic arrives
    # (engine/warmup.py). None = on for CUDA, off for CPU (nothing compiles there).
    warmup: bool | None = None
    # Tensor parallelism: the model split over this many ranks (processes; on CUDA, GPUs
    # device..device+tp_size-1), one scheduler and radix cache on rank 0.
    tp_size: int = 1
    # Tensor parallelism across hosts (torch.distributed's TCPStore rendezvous): the tp_size
    # ranks are spread over nnodes hosts, tp_size // nnodes each; this engine is rank 0 on
    # node 0 and binds dist_init_addr ("HOST:PORT"); the other nodes run `radixrt node`.
    nnodes: int = 1
    dist_init_addr: str | None = None

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"EngineConfig.{field}: {msg}")

        need(self.page_size >= 1 and self.page_size & (self.page_size - 1) == 0,
             "page_size", f"must be a power of two >= 1, got {self.page_size}")
        need(self.kv_cache_tokens is None or self.kv_cache_tokens >= self.page_size,
             "kv_cache_tokens", f"must hold at least one page, got {self.kv_cache_tokens}")
        need(self.host_kv_cache_tokens == "auto" or (
            isinstance(self.host_kv_cache_tokens, int) and (
                self.host_kv_cache_tokens == 0 or self.host_kv_cache_tokens >= self.page_size)),
             "host_kv_cache_tokens",
             f"must be 0 (off), 'auto' or >= page_size, got {self.host_kv_cache_tokens!r}")
        need(self.host_kv_cache_tokens == 0 or self.enable_prefix_cache, "host_kv_cache_tokens",
             "a host tier needs the prefix cache (enable_prefix_cache=True)")
        need(0.0 < self.mem_fraction <= 1.0, "mem_fraction", f"must be in (0, 1], got {self.mem_fraction}")
        need(self.max_running_requests >= 1, "max_running_requests", "must be >= 1")
        need(self.chunked_prefill_size >= self.page_size, "chunked_prefill_size",
             f"must be >= page_size ({self.page_size}), got {self.chunked_prefill_size}")
        need(self.max_prefill_tokens >= self.chunked_prefill_size, "max_prefill_tokens",
             "must be >= chunked_prefill_size")
        need(isinstance(self.piecewise_cuda_graph_max_tokens, int)
             and not isinstance(self.piecewise_cuda_graph_max_tokens, bool)
             and 0 <= self.piecewise_cuda_graph_max_tokens <= 16384,
             "piecewise_cuda_graph_max_tokens",
             f"must be an int in [0, 16384], got {self.piecewise_cuda_graph_max_tokens!r}")
        need(self.schedule_policy in ("lpm", "fcfs"), "schedule_policy",
             f"must be 'lpm' or 'fcfs', got {self.schedule_policy!r}")
        need(self.attention_backend in ("auto", "torch", "triton", "flashinfer"),
             "attention_backend", f"unknown backend {self.attention_backend!r}")
        need(self.prefill_attention in ("triton", "flashinfer"), "prefill_attention",
             f"must be 'triton' or 'flashinfer', got {self.prefill_attention!r}")
        need(self.prefill_attention == "triton" or (
            self.device.startswith("cuda") and self.attention_backend in ("auto", "triton")
            and not self.deterministic_inference), "prefill_attention",
             "'flashinfer' serves the triton backend's prefills on CUDA, without "
             "deterministic_inference")
        need(self.device == "cpu" or self.device.startswith("cuda"), "device",
             f"must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        need(self.dtype == "auto" or self.dtype in _DTYPES, "dtype",
             f"must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        need(self.max_context_len is None or self.max_context_len >= 2, "max_context_len", "must be >= 2")
        need(not self.deterministic_inference or self.device.startswith("cuda"),
             "deterministic_inference", "needs device='cuda' (it runs batch-invariant Triton kernels)")
        need(not self.deterministic_inference or self.attention_backend in ("auto", "triton"),
             "deterministic_inference", f"needs the triton attention backend, not {self.attention_backend!r}")
        need(self.cascade_decode in ("auto", "on", "off"), "cascade_decode",
             f"must be 'auto', 'on' or 'off', got {self.cascade_decode!r}")
        need(self.cascade_decode != "on" or not self.deterministic_inference, "cascade_decode",
             "'on' is not batch-invariant: it cannot be combined with deterministic_inference")
        need(self.cascade_min_shared_pages >= 1, "cascade_min_shared_pages", "must be >= 1")
        need(self.cascade_min_group >= 2, "cascade_min_group", "must be >= 2")
        need(self.load_format in ("auto", "safetensors", "gguf", "dummy"), "load_format",
             f"unknown load format {self.load_format!r}")
        need(isinstance(self.tp_size, int) and self.tp_size >= 1, "tp_size",
             f"must be an int >= 1, got {self.tp_size!r}")
        # The host tier copies one pool's pages; each rank's shard would need its own tier.
        need(self.tp_size == 1 or self.host_kv_cache_tokens == 0, "host_kv_cache_tokens",
             "the host KV tier is not supported with tp_size > 1 yet")
        # A two-rank sum is the same whatever order NCCL adds in; more ranks' sums are not
        # batch-invariant (the reduction order follows the message size).
        need(not self.deterministic_inference or self.tp_size <= 2, "deterministic_inference",
             f"supports tp_size <= 2, got {self.tp_size}")
        need(isinstance(self.nnodes, int) and self.nnodes >= 1
             and self.tp_size % self.nnodes == 0, "nnodes",
             f"must be >= 1 and divide tp_size {self.tp_size}, got {self.nnodes!r}")
        need(self.nnodes == 1 or (self.dist_init_addr is not None
                                  and self.dist_init_addr.rpartition(":")[2].isdigit()),
             "dist_init_addr", f"nnodes > 1 needs HOST:PORT, got {self.dist_init_addr!r}")

    @property
    def overlap(self) -> bool:
        if self.overlap_schedule is None:
            return self.device != "cpu"
        return self.overlap_schedule

    @property
    def warmup_enabled(self) -> bool:
        return self.device != "cpu" if self.warmup is None else self.warmup

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return parse_dtype(self.dtype)
