"""Kernel names -> what they do (GEMM, attention, norm, ...), for profiles of engine steps, and
a profiler summary: kernel time per group, the top kernels, and how busy the GPU was."""

from __future__ import annotations

from typing import Any

GROUPS = (  # first match wins; names are lower-cased kernel names
    ("attention", ("decode", "cascade", "attn", "attention", "merge", "extend", "sdpa", "fmha",
                   "flash", "prefix_tiles")),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul", "splitk")),
    ("norm", ("rms", "norm")),
    ("rope", ("rope", "rotary")),
    ("activation", ("silu", "act_and_mul", "gelu")),
    ("sampling", ("top_p", "topk", "softmax", "argmax", "sample", "bitmask", "exponential",
                  "multinomial", "sort", "cumsum", "max")),
    ("kv_store", ("store_kv",)),
    ("copies", ("copy", "memcpy", "memset", "fill", "index", "gather", "scatter", "cat")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def profile_summary(prof: Any, wall_s: float, top: int = 25) -> dict[str, Any]:
    """From a finished torch.profiler run with CUDA activity: kernel ms per group and per
    kernel, and GPU busy time (the union of kernel intervals) against the wall time."""
    kernels: dict[str, float] = {}
    spans: list[tuple[float, float]] = []
    for ev in prof.events():
        if str(getattr(ev, "device_type", "")).endswith("CUDA") and ev.time_range.elapsed_us() > 0:
            kernels[ev.name] = kernels.get(ev.name, 0.0) + ev.time_range.elapsed_us() / 1e3
            spans.append((ev.time_range.start, ev.time_range.end))
    busy_us, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            busy_us += b - max(a, end)
            end = b
    groups: dict[str, float] = {}
    for name, ms in kernels.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    return {"wall_ms": wall_s * 1e3, "gpu_busy_ms": busy_us / 1e3,
            "kernel_ms": sum(kernels.values()),
            "groups_ms": {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": top_kernels(kernels, top)}


def top_kernels(kernels: dict[str, float], top: int, width: int = 140) -> dict[str, float]:
    """The ``top`` largest of ``kernels`` (name -> ms), names cut to ``width``; names alike up to
    the cut are summed, not overwritten (templated kernels share long prefixes)."""
    cut: dict[str, float] = {}
    for name, ms in kernels.items():
        cut[name[:width]] = cut.get(name[:width], 0.0) + ms
    return {k: round(v, 2) for k, v in sorted(cut.items(), key=lambda kv: -kv[1])[:top]}
