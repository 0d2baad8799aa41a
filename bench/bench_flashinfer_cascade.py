"""Shared-prefix decode, our Triton kernels vs FlashInfer's, one attention layer at the Llama-3-8B
shape (32 q / 8 kv heads, head_dim 128, bf16, page 16), batch 256 = G groups x R requests, 2048
shared + 128..384 own tokens per request (bench_cascade.py's batch):

    triton_per_request   split-KV decode, each request reads its whole KV
    triton_cascade       kernels/cascade_decode.py (prefix once per tile of members)
    fi_decode            FlashInfer tensor-core batch decode, per request
    fi_cascade           attention/flashinfer_cascade.py (shared pass + own pass + merge) in
                         its CUDA-graph form (graph-mode wrappers, padded shared entries,
                         64-row query tile; fi_cascade_tile128 / _tile16: other tiles)
    fi_cascade_eager_plan_fa2 / _fa3   the same with eager plans (shared pass's tile sized to
                         the groups; fa3: FlashInfer's Hopper kernels for the shared pass)

Each is timed eagerly (do_bench over the launch sequence) and replayed from a CUDA graph (what
the engine runs: a step's launches without Python). ``*_plan_us``: host cost of planning a
step. Max abs diffs against Triton per-request decode and an fp32 reference
on a sample of requests.

    python bench/bench_flashinfer_cascade.py [--configs 16x16,64x4] [--out DIR]

Writes DIR/fi_cascade.json ($OUT, else bench/results/flashinfer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cascade import HD, HKV, HQ, _fp32_reference, shared_batch  # noqa: E402

from radixrt.engine.cascade_groups import CascadePolicy  # noqa: E402

PAGE = 16


def _ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _graph_ms(fn: Callable[[], object]) -> float:
    """Median replay time of ``fn`` captured in a CUDA graph (its inputs fixed)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _ms(graph.replay)


def _plan_us(prepare: Callable[[], None], n: int = 50) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        prepare()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def one_config(groups: int, per_group: int, shared: int, suffix: tuple[int, int],
               shared_backends: list[str], graph_tiles: list[int]) -> dict[str, Any]:
    from radixrt.attention.flashinfer_backend import FlashInferBackend
    from radixrt.attention.flashinfer_cascade import FlashInferCascade
    from radixrt.attention.triton_backend import TritonAttentionBackend

    torch.manual_seed(0)
    batch, slots = shared_batch(groups, per_group, shared, suffix, PAGE, "cuda")
    plain = dataclasses.replace(batch, cascade=None)
    bsz = batch.batch_size
    k = torch.randn(slots, HKV, HD, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(slots, HKV, HD, device="cuda", dtype=torch.bfloat16)
    kv = (k.view(-1, PAGE, HKV, HD), v.view(-1, PAGE, HKV, HD))  # the pool's paged view
    q = torch.randn(bsz, HQ, HD, device="cuda", dtype=torch.bfloat16)
    idx = list(range(0, bsz, max(1, bsz // 32)))
    ref = _fp32_reference(q, k, v, batch, idx)
    res: dict[str, Any] = {"shape": {"batch": bsz, "groups": groups, "per_group": per_group,
                                     "shared": shared, "suffix": list(suffix), "page_size": PAGE,
                                     "heads": [HQ, HKV, HD], "dtype": "bfloat16"}}
    outs: dict[str, torch.Tensor] = {}

    def record(name: str, fn: Callable[[], torch.Tensor], prepare: Callable[[], None],
               graph: bool = True) -> None:
        try:
            measure(name, fn, prepare, graph)
        except Exception as exc:  # one variant failing (a kernel family, a size) keeps the rest
            res[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:400]
            print(f"  {name}: FAILED {res[f'{name}_error']}", flush=True)

    def measure(name: str, fn: Callable[[], torch.Tensor], prepare: Callable[[], None],
                graph: bool) -> None:
        prepare()
        outs[name] = fn().clone()
        res[f"{name}_ms"] = _ms(fn)
        if graph:
            res[f"{name}_graph_ms"] = _graph_ms(fn)
        res[f"{name}_plan_us"] = _plan_us(prepare)
        res[f"{name}_max_abs_diff_vs_fp32"] = float((outs[name][idx].float() - ref).abs().max())
        print(f"  {name}: {res[f'{name}_ms']:.3f} ms eager"
              + (f", {res[f'{name}_graph_ms']:.3f} ms graph" if graph else ""), flush=True)

    tri = TritonAttentionBackend(HQ, HKV, HD, HD**-0.5, device="cuda", max_batch_size=bsz,
                                 cascade=CascadePolicy())
    record("triton_per_request", lambda: tri.attend(q, k, v, plain), lambda: tri.prepare(plain))
    record("triton_cascade", lambda: tri.attend(q, k, v, batch), lambda: tri.prepare(batch))
    fi = FlashInferBackend(HQ, HKV, HD, HD**-0.5, device="cuda", max_batch_size=bsz,
                           cascade=CascadePolicy())
    fi.prepare_graph_sizes([bsz])  # the engine's graph path: graph-mode wrappers, padded plans
    record("fi_decode", lambda: fi.attend(q, kv), lambda: fi.prepare(plain))
    record("fi_cascade", lambda: fi.attend(q, kv), lambda: fi.prepare(batch))
    for tile in graph_tiles:  # the graph-mode shared pass's query tile (default 64)
        other = FlashInferBackend(HQ, HKV, HD, HD**-0.5, device="cuda", max_batch_size=bsz,
                                  cascade=CascadePolicy(), cascade_graph_tile=tile)
        other.prepare_graph_sizes([bsz])
        record(f"fi_cascade_tile{tile}", partial(other.attend, q, kv),
               partial(other.prepare, batch))
    # Eager plans (no captured size): the shared pass's query tile sized to the groups; its
    # graph row replays one fixed plan (the kernels' time, not a path the engine can replay).
    eager = FlashInferBackend(HQ, HKV, HD, HD**-0.5, device="cuda", max_batch_size=bsz,
                              cascade=CascadePolicy())
    for backend in shared_backends:
        name = f"fi_cascade_eager_plan_{backend}"
        eager._cascade = FlashInferCascade(
            eager._fi, eager.workspace, num_heads=HQ, num_kv_heads=HKV, head_dim=HD,
            scale=HD**-0.5, dtype=torch.bfloat16, use_tensor_cores=eager.use_tensor_cores,
            shared_backend=backend)
        record(name, lambda: eager.attend(q, kv), lambda: eager.prepare(batch))
    base = outs["triton_per_request"]
    for name, out in outs.items():
        res[f"{name}_max_abs_diff_vs_triton_per_request"] = float((out - base).abs().max())
    t = res.get("triton_per_request_graph_ms")
    res["graph_speedup_vs_triton_per_request"] = {
        n: t / res[f"{n}_graph_ms"] for n in outs if f"{n}_graph_ms" in res} if t else {}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="16x16,64x4", help="GROUPSxPER_GROUP, comma-separated")
    ap.add_argument("--shared", type=int, default=2048)
    ap.add_argument("--suffix", default="128,384", help="own tokens per request: lo,hi")
    ap.add_argument("--shared-backends", default="fa2,fa3",
                    help="FlashInfer kernel families to try for the cascade's shared pass")
    ap.add_argument("--graph-tiles", default="128,16",
                    help="other query tiles to try for the graph-mode shared pass (default 64)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    out = Path(a.out or os.environ.get("OUT") or "bench/results/flashinfer")
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = (int(x) for x in a.suffix.split(","))
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "configs": {}}
    for cfg in a.configs.split(","):
        g, r = (int(x) for x in cfg.split("x"))
        print(f"== {cfg}: {g} groups x {r}, {a.shared} shared + {lo}..{hi} own", flush=True)
        results["configs"][cfg] = one_config(
            g, r, a.shared, (lo, hi), a.shared_backends.split(","),
            [int(t) for t in a.graph_tiles.split(",") if t])
        (out / "fi_cascade.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
