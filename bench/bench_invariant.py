"""What deterministic inference costs, kernel by kernel, and whether the default kernels really
are batch-variant (the reason it exists). CUDA only.

- gemm:  batch_invariant_linear vs F.linear (cuBLAS) on the Llama-3-8B projections at several M,
         plus a sweep of tile configs; and for each, how many rows of a 256-row product change
         when the same rows are computed in a batch of 37 (0 = batch-invariant).
- attn:  invariant_attention vs the split-KV decode kernel (256 x 1k, 8 x 32k) and the extend
         kernel (8 x 1024 prefill).

    python bench/bench_invariant.py [--out DIR]     writes bench_invariant.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_kernels import BF16, DEV, HD, HKV, HQ, paged_kv, random_page_table  # noqa: E402
from radixrt.kernels.decode_attention import decode_attention  # noqa: E402
from radixrt.kernels.decode_plan import choose_num_splits  # noqa: E402
from radixrt.kernels.extend_attention import extend_attention  # noqa: E402
from radixrt.kernels.invariant_attention import (  # noqa: E402
    SplitBuffers,
    invariant_attention,
    invariant_chunk,
)
from radixrt.kernels.matmul import GemmConfig, batch_invariant_linear, gemm_config  # noqa: E402

# Llama-3-8B weights [N, K]: qkv, o, gate_up, down, lm_head.
WEIGHTS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
           "down": (4096, 14336), "lm_head": (128256, 4096)}
SWEEP = [GemmConfig(128, 128, 64, 8, 4), GemmConfig(128, 64, 64, 4, 4), GemmConfig(128, 256, 64, 8, 3),
         GemmConfig(64, 128, 64, 4, 4), GemmConfig(128, 128, 64, 4, 4), GemmConfig(64, 64, 64, 4, 5)]


def ms(fn: Any) -> float:
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def changed_rows(gemm: Any, x: torch.Tensor, w: torch.Tensor) -> int:
    """Rows 100..136 of a 256-row product vs the same 37 rows alone: how many differ."""
    full = gemm(x[:256], w)[100:137]
    part = gemm(x[100:137], w)
    return int((full != part).any(dim=1).sum())


def bench_weight(n: int, k: int) -> dict[str, Any]:
    w = torch.randn(n, k, device=DEV, dtype=BF16) / k**0.5
    x = torch.randn(8192, k, device=DEV, dtype=BF16)
    row: dict[str, Any] = {"default_config": str(gemm_config(n, BF16, DEV))}
    row["cublas_changed_rows"] = changed_rows(F.linear, x, w)
    row["invariant_changed_rows"] = changed_rows(batch_invariant_linear, x, w)
    for m in (1, 32, 256, 1024, 8192):
        xm = x[:m]
        t_cublas = ms(lambda: F.linear(xm, w))  # noqa: B023 - timed before xm changes
        t_inv = ms(lambda: batch_invariant_linear(xm, w))  # noqa: B023
        row[f"m{m}"] = {"cublas_ms": t_cublas, "invariant_ms": t_inv, "ratio": t_inv / t_cublas,
                        "invariant_tflops": 2 * m * n * k / t_inv / 1e9}
    sweep = []
    for cfg in SWEEP:
        try:
            t256 = ms(lambda: batch_invariant_linear(x[:256], w, config=cfg))  # noqa: B023
            t8k = ms(lambda: batch_invariant_linear(x, w, config=cfg))  # noqa: B023
            sweep.append({"config": str(cfg), "m256_ms": t256, "m8192_ms": t8k})
        except Exception as exc:  # noqa: BLE001 - a config may not fit shared memory
            sweep.append({"config": str(cfg), "error": repr(exc)[:160]})
    row["sweep"] = sweep
    return row


def bench_gemm() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (n, k) in WEIGHTS.items():
        row = bench_weight(n, k)
        out[name] = row
        print(name, {k2: v for k2, v in row.items() if k2 != "sweep"}, flush=True)
        for s in row["sweep"]:
            print("   ", s, flush=True)
    return out


def paged(batch: int, seq: int, page: int = 16) -> tuple[torch.Tensor, ...]:
    """(k_flat, v_flat, page_table, req_rows) of ``batch`` random sequences of ``seq`` tokens."""
    k, v, num_pages = paged_kv(batch * seq, page)
    return (k, v, *random_page_table(batch, seq, page, num_pages))


def bench_decode_case(batch: int, seq: int, sms: int) -> dict[str, float]:
    k, v, table, rows = paged(batch, seq)
    q = torch.randn(batch, HQ, HD, device=DEV, dtype=BF16)
    seq_lens = torch.full((batch,), seq, device=DEV, dtype=torch.int32)
    splits = choose_num_splits(batch, HKV, sms, 32)
    po = torch.empty(batch * HQ * splits * HD, device=DEV)
    pl = torch.empty(batch * HQ * splits, device=DEV)
    indptr = torch.arange(batch + 1, device=DEV, dtype=torch.int32)
    prefix = seq_lens - 1
    t_dec = ms(lambda: decode_attention(q, k, v, seq_lens, table, rows, 16, HD**-0.5, splits, po, pl))
    chunk = invariant_chunk(32768, DEV)
    t_inv = ms(lambda: invariant_attention(q, k, v, indptr, prefix, table, rows, 16, 1,
                                           HD**-0.5, chunk=chunk))
    kv_gb = 2 * batch * seq * HKV * HD * 2 / 1e9
    res = {"split_kv_ms": t_dec, "invariant_ms": t_inv, "split_kv_gbs": kv_gb / t_dec * 1e3,
           "invariant_gbs": kv_gb / t_inv * 1e3}
    if batch * HKV < sms:  # what the backend would run: one program per KV chunk
        buf = SplitBuffers(batch, HKV, HQ // HKV, HD, -(-seq // chunk), DEV)
        t_split = ms(lambda: invariant_attention(q, k, v, indptr, prefix, table, rows, 16, 1,
                                                 HD**-0.5, chunk=chunk, split=buf,
                                                 seq_lens=seq_lens))
        res.update(invariant_chunked_ms=t_split, invariant_chunked_gbs=kv_gb / t_split * 1e3)
    return res


def bench_attn() -> dict[str, Any]:
    out: dict[str, Any] = {}
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    for batch, seq in ((256, 1024), (8, 32768)):
        out[f"decode {batch}x{seq}"] = bench_decode_case(batch, seq, sms)
        print(f"decode {batch}x{seq}", out[f"decode {batch}x{seq}"], flush=True)
    batch, new = 8, 1024
    k, v, table, rows = paged(batch, new)
    q = torch.randn(batch * new, HQ, HD, device=DEV, dtype=BF16)
    indptr = torch.arange(0, (batch + 1) * new, new, device=DEV, dtype=torch.int32)
    prefix = torch.zeros(batch, device=DEV, dtype=torch.int32)
    t_ext = ms(lambda: extend_attention(q, k, v, indptr, prefix, table, rows, 16, new, HD**-0.5))
    t_inv = ms(lambda: invariant_attention(q, k, v, indptr, prefix, table, rows, 16, new, HD**-0.5,
                                           chunk=invariant_chunk(32768, DEV)))
    out["prefill 8x1024"] = {"extend_ms": t_ext, "invariant_ms": t_inv}
    print("prefill 8x1024", out["prefill 8x1024"], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    ap.add_argument("--attn-only", action="store_true", help="skip the GEMM sweep")
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "attn": bench_attn()}
    if not a.attn_only:
        res["gemm"] = bench_gemm()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench_invariant.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
