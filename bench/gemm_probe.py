"""Decode-step projections at batch M: cuBLAS as the model calls it vs the alternatives we could
switch to (issue 18: at 256 x 1k the GEMMs take ~6.3 ms against a 4.9 ms floor).

    python3 bench/gemm_probe.py --out $OUT [--m 16,64,256] [--budget-s 120]

Llama-3-8B's projections (qkv, o, gate_up, down, lm_head), bf16, one layer's weight per call
(each larger than L2, so every call reads its weight from DRAM). Variants per (shape, M):
``linear`` (F.linear, cuBLAS's pick), ``cublaslt`` (torch's preferred BLAS set to cuBLASLt),
``kn`` (the weight stored [K, N]: x @ W, another cuBLAS layout), ``halves`` (N in two calls),
and ``triton:<cfg>`` (radixrt.kernels.matmul with a tile config from a small sweep). Each is
timed by triton.testing.do_bench (median ms) and set against max(FLOPs / matmul rate, weight
bytes / copy bandwidth). Writes gemm_probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.floor import measure_hardware  # noqa: E402
from radixrt.kernels.matmul import GemmConfig, batch_invariant_linear  # noqa: E402

SHAPES = {  # name: (N, K) of the weight [N, K], Llama-3-8B
    "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
TRITON_CFGS = [GemmConfig(bm, bn, bk, w, s) for bm, bn, bk, w, s in (
    (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
    (64, 256, 64, 4, 3), (128, 64, 64, 4, 5), (64, 64, 128, 4, 4), (256, 128, 64, 8, 3),
)]


def probe_shape(name: str, m: int, n: int, k: int, hw: Any, do_bench: Any) -> dict[str, Any]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    ref = F.linear(x, w).float()
    floor_ms = max(2 * m * n * k / hw.matmul_flops, 2 * n * k / hw.copy_bandwidth) * 1e3
    wt = w.t().contiguous()
    w1, w2 = w[: n // 2], w[n // 2:]
    variants: dict[str, Any] = {
        "linear": lambda: F.linear(x, w), "kn": lambda: x @ wt,
        "halves": lambda: (F.linear(x, w1), F.linear(x, w2)),
    }
    for cfg in TRITON_CFGS:
        tag = f"triton:{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"
        variants[tag] = lambda c=cfg: batch_invariant_linear(x, w, config=c)
    res: dict[str, float] = {}
    for vname, fn in variants.items():
        try:
            y = fn()
            if isinstance(y, torch.Tensor):
                err = (y.float() - ref).abs().max().item()
                assert err < 0.05 * ref.abs().max().item() + 1e-2, f"{vname}: error {err}"
            res[vname] = do_bench(fn, warmup=10, rep=40)
        except Exception as exc:  # noqa: BLE001 - a config that does not fit: skip it
            res[vname] = float("nan")
            print(f"  {name} M={m} {vname}: {exc!r}"[:200])
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        res["cublaslt"] = do_bench(lambda: F.linear(x, w), warmup=10, rep=40)
    finally:
        torch.backends.cuda.preferred_blas_library("cublas")
    best_ms, best = min((v, k_) for k_, v in res.items() if v == v)
    return {"m": m, "shape": name, "n": n, "k": k, "floor_ms": floor_ms, "ms": res, "best": best,
            "linear_over_floor": res["linear"] / floor_ms, "best_over_floor": best_ms / floor_ms}


def main() -> None:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--m", default="16,64,256")
    ap.add_argument("--budget-s", type=float, default=120.0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hw = measure_hardware("cuda", torch.bfloat16)
    t_end = time.perf_counter() + a.budget_s
    rows: list[dict[str, Any]] = []
    for m in [int(x) for x in a.m.split(",")]:
        for name, (n, k) in SHAPES.items():
            if time.perf_counter() > t_end:
                break
            row = probe_shape(name, m, n, k, hw, do_bench)
            rows.append(row)
            print(f"M={m:4d} {name:8s} floor {row['floor_ms']:.4f} ms  linear "
                  f"{row['ms']['linear']:.4f} ({row['linear_over_floor']:.2f}x)  best {row['best']} "
                  f"{row['best_over_floor'] * row['floor_ms']:.4f} ({row['best_over_floor']:.2f}x)",
                  flush=True)
    (out / "gemm_probe.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "matmul_flops": hw.matmul_flops,
         "copy_bw": hw.copy_bandwidth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
