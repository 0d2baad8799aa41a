"""Hardware floor of a workload: the time no engine can beat on this model and machine.

Roofline sum, as the benchmark issue defines it::

    floor = prefill FLOPs / matmul rate          (prefill is compute-bound)
          + decode time

    prefill FLOPs, per request with c cached and n new prompt tokens:
        2 * P_linear * n                         weights x tokens
      + 4 * heads * head_dim * L * (n*c + n(n+1)/2)   QK^T and PV over the causal context
      + 2 * hidden * vocab                       lm_head on the last position only
    decode bytes = steps * weight bytes  +  sum over generated tokens of (context KV bytes)
        steps = ceil(decode tokens / batch), batch = how many requests decode together

Two decode times are reported. The bandwidth floor (``bandwidth_decode_s``, the original one)
is max(all bytes / bandwidth, all FLOPs / rate). The compute-aware floor (``decode_s``, the one
``total_s`` uses) takes the max of compute and memory time per operation: the projections of a
step read the weights once and multiply every token of the step (compute-bound at large
batches: batch 256 of an 8B model is ~4.9 ms at the matmul rate vs ~3.8 ms to read the weights),
and attention reads each token's context KV (memory-bound). Its step count is also at least the
longest request's output, whose tokens come one step after another.

Decode is the same with or without the cache (each request reads its whole context every step),
so the cache only shrinks the prefill term: ideal speedup = floor(cache off) / floor(optimal hits).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype_bytes: int

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if k != "tie_word_embeddings":
                assert v >= 1, f"ModelShape.{k} must be >= 1, got {v}"

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], dtype_bytes: int = 2) -> ModelShape:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            num_layers=int(cfg["num_hidden_layers"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]), num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype_bytes=dtype_bytes,
        )

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h  # q, k, v, o projections
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        return attn + mlp

    @property
    def linear_params(self) -> int:
        """Parameters every token multiplies through (all layers; not the lm_head)."""
        return self.num_layers * self.layer_params

    @property
    def weight_bytes(self) -> int:
        """Bytes one decode step reads: every layer plus the lm_head (embedding lookups are rows)."""
        return (self.linear_params + self.hidden_size * self.vocab_size) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def prefill_flops(self, cached: int, new: int) -> float:
        if new <= 0:
            return 0.0
        attn_pairs = new * cached + new * (new + 1) / 2  # (query, key) pairs, causal
        return (2.0 * self.linear_params * new
                + 4.0 * self.num_heads * self.head_dim * self.num_layers * attn_pairs
                + 2.0 * self.hidden_size * self.vocab_size)

    def decode_token_flops(self, context: int) -> float:
        return (2.0 * (self.linear_params + self.hidden_size * self.vocab_size)
                + 4.0 * self.num_heads * self.head_dim * self.num_layers * context)

    def attention_flops(self, cached: int, new: int) -> float:
        """QK^T and PV FLOPs of ``new`` causal queries after ``cached`` keys, all layers."""
        pairs = new * cached + new * (new + 1) / 2
        return 4.0 * self.num_heads * self.head_dim * self.num_layers * pairs


@dataclass(frozen=True)
class Hardware:
    name: str
    matmul_flops: float  # FLOP/s measured on a large matmul in the run's dtype
    copy_bandwidth: float  # bytes/s (read + write) measured on a large device copy

    def __post_init__(self) -> None:
        assert self.matmul_flops > 0 and self.copy_bandwidth > 0, f"bad hardware numbers {self}"


@dataclass(frozen=True)
class RequestShape:
    prompt_len: int
    cached_len: int
    output_len: int

    def __post_init__(self) -> None:
        assert 0 <= self.cached_len < self.prompt_len, f"cached must be < prompt: {self}"
        assert self.output_len >= 1, f"output_len must be >= 1: {self}"


@dataclass(frozen=True)
class Floor:
    prefill_flops: float
    prefill_s: float
    decode_steps: int  # max(ceil(decode tokens / batch), longest request's decode tokens)
    decode_bytes: float
    decode_flops: float
    decode_s: float  # compute-aware: max(compute, memory) per operation
    bandwidth_decode_s: float  # the original floor: max(bytes / bandwidth, FLOPs / rate)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def bandwidth_total_s(self) -> float:
        return self.prefill_s + self.bandwidth_decode_s

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_s": self.total_s,
                "bandwidth_total_s": self.bandwidth_total_s}


def floor_time(
    shape: ModelShape, hw: Hardware, requests: Sequence[RequestShape], batch: int
) -> Floor:
    """Floor for ``requests`` when at most ``batch`` of them decode in one step."""
    assert batch >= 1, f"batch must be >= 1, got {batch}"
    prefill = sum(shape.prefill_flops(r.cached_len, r.prompt_len - r.cached_len) for r in requests)
    # The first output token comes out of prefill; each later one is one decode step's row.
    decode_tokens = sum(r.output_len - 1 for r in requests)
    steps = math.ceil(decode_tokens / batch) if decode_tokens else 0
    kv_bytes = 0.0
    attn_flops = 0.0
    for r in requests:
        # Token k (1..out-1) attends to prompt + k tokens: sum_k (p + k) in closed form.
        m = r.output_len - 1
        ctx = m * r.prompt_len + m * (m + 1) / 2
        kv_bytes += ctx * shape.kv_bytes_per_token
        attn_flops += 4.0 * shape.num_heads * shape.head_dim * shape.num_layers * ctx
    token_flops = shape.decode_token_flops(0)  # projections + lm_head, per decoded token
    flops = decode_tokens * token_flops + attn_flops
    dbytes = steps * shape.weight_bytes + kv_bytes
    bandwidth_s = max(dbytes / hw.copy_bandwidth, flops / hw.matmul_flops)
    # Compute-aware: a request's tokens are sequential, so at least its decode length in steps;
    # spreading the tokens evenly over them minimizes the per-step max (it is convex).
    seq_steps = max([steps] + [r.output_len - 1 for r in requests])
    linear_s = seq_steps * max(decode_tokens / seq_steps * token_flops / hw.matmul_flops,
                               shape.weight_bytes / hw.copy_bandwidth) if seq_steps else 0.0
    attention_s = max(kv_bytes / hw.copy_bandwidth, attn_flops / hw.matmul_flops)
    return Floor(prefill, prefill / hw.matmul_flops, seq_steps, dbytes, flops,
                 linear_s + attention_s, bandwidth_s)


def chunked_prefill_floor(shape: ModelShape, hw: Hardware, prompt_len: int,
                          chunk: int) -> dict[str, float]:
    """Floor of one cold prompt prefilled ``chunk`` tokens per step, both ways: ``flops_s`` is
    all FLOPs at the matmul rate (the original prefill floor); ``floor_s`` takes per step the
    max of compute and memory time of the projections (weights read once a step) and of
    attention (each chunk reads its whole prefix's KV), plus the lm_head once."""
    assert prompt_len >= 1 and chunk >= 1, f"bad prompt {prompt_len} / chunk {chunk}"
    rate, bw = hw.matmul_flops, hw.copy_bandwidth
    linear_bytes = shape.linear_params * shape.dtype_bytes
    total = 0.0
    for start in range(0, prompt_len, chunk):
        n = min(chunk, prompt_len - start)
        total += max(2.0 * shape.linear_params * n / rate, linear_bytes / bw)
        kv_read = (start + n) * shape.kv_bytes_per_token
        total += max(shape.attention_flops(start, n) / rate, kv_read / bw)
    lm_head = shape.hidden_size * shape.vocab_size
    total += max(2.0 * lm_head / rate, lm_head * shape.dtype_bytes / bw)
    flops = shape.prefill_flops(0, prompt_len)
    return {"prompt_len": prompt_len, "chunk": chunk, "prefill_flops": flops,
            "attention_flops": shape.attention_flops(0, prompt_len),
            "flops_s": flops / rate, "floor_s": total}


def decode_batch(
    requests: Sequence[RequestShape], *, max_running: int, streams: int, kv_tokens: int | None
) -> int:
    """How many requests can decode together: engine cap, workload concurrency, KV capacity."""
    b = min(max_running, streams, len(requests)) if requests else 1
    if kv_tokens is not None and requests:
        mean_ctx = sum(r.prompt_len + r.output_len for r in requests) / len(requests)
        b = min(b, max(1, int(kv_tokens // mean_ctx)))
    return max(1, b)


def workload_floors(
    shape: ModelShape, hw: Hardware, prompts_outputs: Sequence[tuple[int, int]],
    optimal_cached: Sequence[int], batch: int,
) -> dict[str, Any]:
    """Cache-off and optimal-hit floors plus the ideal cache speedup, as one JSON-able dict."""
    off = [RequestShape(p, 0, o) for p, o in prompts_outputs]
    opt = [RequestShape(p, min(c, p - 1), o) for (p, o), c in zip(prompts_outputs, optimal_cached)]
    f_off = floor_time(shape, hw, off, batch)
    f_opt = floor_time(shape, hw, opt, batch)
    return {
        "batch": batch, "cache_off": f_off.to_dict(), "optimal": f_opt.to_dict(),
        "ideal_speedup": f_off.total_s / f_opt.total_s if f_opt.total_s > 0 else 1.0,
    }


def _timeit(fn: Any, device: torch.device, iters: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters


def measure_hardware(device: str, dtype: torch.dtype, *, copy_mib: int | None = None,
                     matmul_n: int | None = None, iters: int = 10) -> Hardware:
    """Measure copy bandwidth and matmul rate on ``device`` (GPU: 1 GiB copy, 8192^3 matmul)."""
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    mib = copy_mib or (1024 if gpu else 128)
    n = matmul_n or (8192 if gpu else 1024)
    bufs = [torch.empty(mib << 20, dtype=torch.uint8, device=dev) for _ in range(2)]
    t_copy = _timeit(lambda: bufs[1].copy_(bufs[0]), dev, iters)
    bufs.clear()
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    t_mm = _timeit(lambda: a @ b, dev, iters)
    name = torch.cuda.get_device_name(dev) if gpu else "cpu"
    return Hardware(name, 2.0 * n**3 / t_mm, 2.0 * (mib << 20) / t_copy)
