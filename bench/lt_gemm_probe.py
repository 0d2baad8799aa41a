"""Decode-shape GEMMs: F.linear (cuBLAS's heuristic pick) against every cuBLASLt candidate, timed.

Two parts, both timed by CUDA-graph replay with the weights cold in L2:

* ``shapes``: for each projection of the model and each row count M, a ring of weight copies
  (>= 240 MB in all, so every call reads its weight from HBM) run through F.linear and through
  each algorithm ``LtGemm.candidates`` returns; the fastest per (projection, M) is kept.
* ``chain``: 32 layers of distinct weights (qkv, o, gate_up, down) and the lm_head, as a decode
  step's GEMMs run, once all on F.linear and once each on its shape's fastest candidate.

Writes ``lt_gemm_probe.json`` under ``--out``. Usage: ``python3 bench/lt_gemm_probe.py --out DIR``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_kernels import copy_bandwidth_gbs  # noqa: E402
from lt_gemm import Candidate, LtGemm  # noqa: E402

# Llama-3-8B projections: name -> (N, K).
PROJECTIONS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
               "down": (4096, 14336), "lm_head": (128256, 4096)}
RING_BYTES = 240 << 20


def graph_ms(calls: Sequence[Callable[[], object]], iters: int = 7) -> float:
    """Median ms of one replay of a graph running ``calls`` in order."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB fp32 device copy, read + written (a uint8 copy runs slower: 2.7 vs
    4.2 TB/s on an H200, session 11's first run of this probe, whose floors used it)."""
    return copy_bandwidth_gbs() * 1e9


def probe_shape(lt: LtGemm, name: str, m: int, limit: int,
                bw: float) -> tuple[dict[str, Any], Candidate | None]:
    """The shape's row for the results file, and its fastest correct candidate."""
    n, k = PROJECTIONS[name]
    dt = torch.bfloat16
    copies = max(2, -(-RING_BYTES // (n * k * 2)))
    ring = [torch.randn(n, k, dtype=dt, device="cuda") * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, dtype=dt, device="cuda")
    y = torch.empty(m, n, dtype=dt, device="cuda")
    ref = F.linear(x, ring[0]).float()
    calls_per = 2 * copies

    def timed(fn: Callable[[torch.Tensor], object]) -> float:
        calls = [functools.partial(fn, w) for w in ring * 2]
        return graph_ms(calls) / calls_per

    base = timed(lambda w: torch.mm(x, w.t(), out=y))  # F.linear's kernel, into y
    rows: list[dict[str, Any]] = []
    by_rank: dict[int, Candidate] = {}

    def lt_call(cand: Candidate, w: torch.Tensor) -> object:
        return lt.matmul(x, w, y, cand)

    for cand in lt.candidates(m, n, k, dt, limit):
        by_rank[cand.rank] = cand
        try:
            lt.matmul(x, ring[0], y, cand)
            err = (y.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
            ms = timed(functools.partial(lt_call, cand))
        except RuntimeError as exc:
            rows.append({"rank": cand.rank, "error": str(exc)[:120]})
            continue
        rows.append({"rank": cand.rank, "ms": ms, "rel_err": err, "workspace": cand.workspace,
                     **cand.config})
    ok = [r for r in rows if "ms" in r and r["rel_err"] < 2e-2]
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    floor_ms = n * k * 2 / bw * 1e3
    ring.clear()
    torch.cuda.empty_cache()
    row = {"name": name, "m": m, "n": n, "k": k, "floor_ms": floor_ms, "linear_ms": base,
           "best": best, "candidates": rows}
    return row, by_rank[best["rank"]] if best is not None else None


def chain(lt: LtGemm, picks: dict[tuple[str, int], Candidate | None], m: int,
          layers: int) -> dict[str, Any]:
    dt = torch.bfloat16
    names = ("qkv", "o", "gate_up", "down")
    weights = [{nm: torch.randn(*PROJECTIONS[nm], dtype=dt, device="cuda") * 0.02 for nm in names}
               for _ in range(layers)]
    head = torch.randn(*PROJECTIONS["lm_head"], dtype=dt, device="cuda") * 0.02
    xs = {nm: torch.randn(m, PROJECTIONS[nm][1], dtype=dt, device="cuda")
          for nm in (*names, "lm_head")}
    ys = {nm: torch.empty(m, PROJECTIONS[nm][0], dtype=dt, device="cuda")
          for nm in (*names, "lm_head")}
    seq = [(nm, lw[nm]) for lw in weights for nm in names] + [("lm_head", head)]

    def call(nm: str, w: torch.Tensor, lt_on: bool) -> Callable[[], object]:
        cand = picks.get((nm, m)) if lt_on else None
        if cand is None:
            return lambda: torch.mm(xs[nm], w.t(), out=ys[nm])
        return lambda: lt.matmul(xs[nm], w, ys[nm], cand)

    res: dict[str, Any] = {"m": m, "linear_ms": graph_ms([call(nm, w, False) for nm, w in seq]),
           "lt_ms": graph_ms([call(nm, w, True) for nm, w in seq])}
    floor = sum(PROJECTIONS[nm][0] * PROJECTIONS[nm][1] * 2 for nm, _ in seq)
    res["floor_bytes"] = floor
    del weights, head
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="1,8,16,32,48,64,96,128,192,256")
    ap.add_argument("--limit", type=int, default=32, help="candidates asked of the heuristic")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--chain-ms", default="16,32,64,128,256")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    lt = LtGemm(torch.device("cuda"))
    bw = copy_bandwidth()
    print(f"copy {bw / 1e12:.2f} TB/s; libcublasLt {lt.lib.lib._name}", flush=True)
    result: dict[str, Any] = {"copy_bw": bw, "device": torch.cuda.get_device_name(),
                                 "torch": torch.__version__, "shapes": [], "chain": []}
    picks: dict[tuple[str, int], Candidate | None] = {}
    t0 = time.time()
    for m in (int(v) for v in args.ms.split(",")):
        for name in PROJECTIONS:
            row, fastest = probe_shape(lt, name, m, args.limit, bw)
            result["shapes"].append(row)
            best, lin, fl = row["best"], row["linear_ms"], row["floor_ms"]
            if best is not None and best["ms"] < lin:
                picks[(name, m)] = fastest
            b = (f"best rank {best['rank']} {best['ms'] * 1e3:.1f} us ({best['ms'] / fl:.2f}x) "
                 f"splitk {best['splitk']} tile {best['tile']} stages {best['stages']}"
                 if best else "no candidate")
            print(f"M={m:4d} {name:8s} floor {fl * 1e3:6.1f} us linear {lin * 1e3:6.1f} us "
                  f"({lin / fl:.2f}x)  {b}  [{len(row['candidates'])} cands]", flush=True)
        with open(os.path.join(args.out, "lt_gemm_probe.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"shapes done in {time.time() - t0:.0f} s", flush=True)
    for m in (int(v) for v in args.chain_ms.split(",")):
        row = chain(lt, picks, m, args.layers)
        result["chain"].append(row)
        fl = row["floor_bytes"] / bw * 1e3
        print(f"chain M={m:4d}: linear {row['linear_ms']:.3f} ms ({row['linear_ms'] / fl:.2f}x) "
              f"lt {row['lt_ms']:.3f} ms ({row['lt_ms'] / fl:.2f}x) floor {fl:.3f} ms", flush=True)
        with open(os.path.join(args.out, "lt_gemm_probe.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
