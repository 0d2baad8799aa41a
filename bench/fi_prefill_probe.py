"""Paged prefill attention: FlashInfer's FA3 (sm90a) and FA2 kernels against the engine's Triton
extend kernel, on bench_prefill.py's shapes (Llama-3-8B heads, page 16, shuffled pages).

Each kernel is checked against the fp32 reference on sampled rows (``Case.err``) and timed with
``do_bench``; rates are useful causal FLOPs as % of a bf16 8192^3 matmul timed in the same run.
Needs flashinfer importable (bench/gpu_flashinfer.sh installs the carried wheels; its JIT builds
the kernels on first use). Writes ``fi_prefill_probe.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prefill import (  # noqa: E402
    HD,
    HKV,
    HQ,
    PAGE,
    SHAPES,
    Case,
    matmul_tflops,
    measure,
    softmax_scale,
    timer,
)


def flashinfer_run(case: Case, backend: str) -> Any:
    """A planned FlashInfer prefill over the case's pages; returns ``fn(out)``."""
    import flashinfer

    dev = case.q.device
    seq = case.prefix + case.new
    per_req = -(-seq // PAGE)
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
    i32 = dict(dtype=torch.int32, device=dev)
    kv_indptr = torch.arange(case.batch + 1, **i32) * per_req
    kv_indices = case.table[case.rows.long()][:, :per_req].flatten().contiguous()
    last = torch.full((case.batch,), seq - (per_req - 1) * PAGE, **i32)
    wrapper.plan(case.indptr, kv_indptr, kv_indices, last, HQ, HKV, HD, PAGE, causal=True,
                 sm_scale=softmax_scale(HD), q_data_type=case.q.dtype, kv_data_type=case.k.dtype)
    pages = case.k.shape[0] // PAGE
    kv = (case.k.view(pages, PAGE, HKV, HD), case.v.view(pages, PAGE, HKV, HD))
    return lambda out: wrapper.run(case.q, kv, out=out)


def triton_run(case: Case) -> Any:
    """The engine's extend kernel (its config table, split-KV by length) on the case."""
    return lambda out: case.run_new(out, None, None, auto=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", default="fa3,fa2")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    ms = timer(dev)
    mm = matmul_tflops(dev, ms)
    print(f"matmul {mm:.0f} TFLOP/s", flush=True)
    res: dict[str, Any] = {"matmul_tflops": mm, "device": torch.cuda.get_device_name(), "rows": {}}
    for name, (batch, new, prefix) in SHAPES.items():
        torch.manual_seed(0)
        case = Case(batch, new, prefix, dev, torch.bfloat16, (HQ, HKV, HD),
                    page_runs="page runs" in name)
        row: dict[str, Any] = {"triton": measure(case, triton_run(case), mm, ms)}
        for backend in args.backends.split(","):
            try:
                fn = flashinfer_run(case, backend)
                row[backend] = measure(case, fn, mm, ms)
            except Exception as exc:  # noqa: BLE001 - a backend may not build or plan here
                row[backend] = {"error": repr(exc)[:300]}
        res["rows"][name] = row
        shown = "  ".join(
            f"{k} " + (f"{v['pct_of_matmul']:.1f}% ({v['ms']:.3f} ms, err {v['rel_err']:.1e})"
                       if "ms" in v else v["error"][:80]) for k, v in row.items())
        print(f"{name:30s} {shown}", flush=True)
        with open(os.path.join(args.out, "fi_prefill_probe.json"), "w") as f:
            json.dump(res, f, indent=1)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
