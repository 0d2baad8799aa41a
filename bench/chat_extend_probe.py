"""Extend attention on chat-like mixed steps: where the kernel's time goes and which tile, split
and page layout wins there (issue 18: chat's `_extend_newkv_kernel` ran at ~40% of the matmul
rate, against 70% for one 32k prompt).

    python3 bench/chat_extend_probe.py --out $OUT [--quick]

A case is one layer's attention of a step that mixes ``decodes`` decode rows (one new token over
a 500-3,500-token context each) with ``extends`` requests of ``new`` tokens over a ``prefix``,
Llama-3-8B attention (32 / 8 heads, head_dim 128, bf16, page 16), the new tokens' K/V passed
densely as the engine does. Each request's pages are either one ascending run (a fresh allocator)
or randomly permuted (a fragmented pool). Every variant (tile config, forced split count) is
timed inside a CUDA graph (``do_bench_cudagraph``, median) and checked against the engine's
default on the same inputs. Writes chat_extend_probe.json; rates are useful causal FLOPs as % of
a bf16 8192^3 matmul timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radixrt.kernels.extend_attention import extend_attention, extend_flops  # noqa: E402
from radixrt.kernels.extend_configs import ExtendConfig  # noqa: E402
from radixrt.kernels.extend_runs import ExtendReuse  # noqa: E402

HQ, HKV, HD, PAGE = 32, 8, 128, 16
DEV, BF16 = "cuda", torch.bfloat16
CASES = {  # name: (decode rows, extend requests, new tokens each, their prefix)
    "14 dec + 2x400 / 2k": (14, 2, 400, 2048),
    "14 dec + 4x400 / 1k": (14, 4, 400, 1024),
    "12 dec + 1x1500 / 3k": (12, 1, 1500, 3072),
    "30 dec + 2x400 / 2k": (30, 2, 400, 2048),
    "2x400 / 2k": (0, 2, 400, 2048),
    "1x400 / 2k": (0, 1, 400, 2048),
    "14 dec": (14, 0, 0, 0),
}
# (block_m, block_n, heads_per_tile, warps, stages); the first is the engine's (extend_configs).
CONFIGS = [(64, 64, 4, 4, 3), (64, 64, 4, 4, 2), (64, 64, 4, 4, 4), (128, 64, 4, 4, 2),
           (128, 64, 4, 8, 3), (64, 128, 4, 4, 2), (64, 32, 4, 4, 4), (128, 128, 4, 8, 2),
           (64, 64, 2, 4, 3), (32, 64, 4, 4, 3)]
SPLITS = (2, 4)


class Step:
    def __init__(self, decodes: int, extends: int, new: int, prefix: int, runs: bool) -> None:
        rng = random.Random(0)
        prefixes = [rng.randrange(500, 3500) for _ in range(decodes)] + [prefix] * extends
        news = [1] * decodes + [new] * extends
        pages = [-(-(p + n) // PAGE) for p, n in zip(prefixes, news)]
        total = sum(pages)
        ids = torch.arange(total) + 1 if runs else torch.randperm(total) + 1
        width = max(pages)
        self.table = torch.zeros(len(pages) + 1, width, dtype=torch.int32)
        at = 0
        for i, n in enumerate(pages):
            self.table[i + 1, :n] = ids[at: at + n].to(torch.int32)
            at += n
        self.table = self.table.to(DEV)
        self.rows = torch.arange(1, len(pages) + 1, dtype=torch.int32, device=DEV)
        shape = ((total + 1) * PAGE, HKV, HD)
        self.k = torch.randn(shape, device=DEV, dtype=BF16)
        self.v = torch.randn(shape, device=DEV, dtype=BF16)
        self.prefix_lens = torch.tensor(prefixes, dtype=torch.int32, device=DEV)
        indptr = [0]
        for n in news:
            indptr.append(indptr[-1] + n)
        self.indptr = torch.tensor(indptr, dtype=torch.int32, device=DEV)
        t = indptr[-1]
        self.q = torch.randn(t, HQ, HD, device=DEV, dtype=BF16)
        slots = []
        for i, (p, n) in enumerate(zip(prefixes, news)):
            pos = torch.arange(p, p + n, device=DEV)
            slots.append(self.table[i + 1].long()[pos // PAGE] * PAGE + pos % PAGE)
        sl = torch.cat(slots)
        self.k_new, self.v_new = self.k[sl].contiguous(), self.v[sl].contiguous()
        self.max_extend = max(news)
        self.max_seq = max(p + n for p, n in zip(prefixes, news))
        self.flops = extend_flops(news, prefixes, HQ, HD)
        self.reuse = ExtendReuse()
        self.out = torch.empty_like(self.q)

    def run(self, cfg: ExtendConfig | None, splits: int | None) -> torch.Tensor:
        return extend_attention(
            self.q, self.k, self.v, self.indptr, self.prefix_lens, self.table, self.rows, PAGE,
            self.max_extend, HD**-0.5, self.out, cfg, max_seq_len=self.max_seq,
            num_kv_splits=splits, k_new=self.k_new, v_new=self.v_new, reuse=self.reuse,
        )  # fmt: skip


def time_variant(step: Step, cfg: ExtendConfig | None, splits: int | None,
                 ref: torch.Tensor | None, mm: float) -> dict[str, Any]:
    try:
        got = step.run(cfg, splits).float().clone()
        torch.cuda.synchronize()
        us = do_bench_cudagraph(lambda: step.run(cfg, splits), rep=60, return_mode="median") * 1e3
    except Exception as exc:  # noqa: BLE001 - a config may not fit (shared memory, registers)
        return {"error": repr(exc)[:200]}
    row: dict[str, Any] = {"us": us, "pct": 100 * step.flops / (us * 1e-6) / 1e12 / mm}
    if ref is not None:
        row["max_abs_diff"] = float((got - ref).abs().max())
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="default and 3 configs only")
    ap.add_argument("--budget-s", type=float, default=400.0)
    a = ap.parse_args()
    deadline = time.perf_counter() + a.budget_s
    x = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    mm = 2 * 8192**3 / (do_bench(lambda: x @ x, rep=200, return_mode="median") * 1e-3) / 1e12
    print(f"matmul {mm:.0f} TFLOP/s", flush=True)
    configs = CONFIGS[:4] if a.quick else CONFIGS
    result: dict[str, Any] = {"matmul_tflops": mm, "cases": {}}
    for name, case in CASES.items():
        for runs in (True, False):
            key = f"{name} ({'runs' if runs else 'random'})"
            step = Step(*case, runs=runs)
            base = time_variant(step, None, None, None, mm)
            ref = step.run(None, None).float().clone()
            rows: dict[str, Any] = {"default": base}
            line = [f"default {base.get('us', float('nan')):.1f}us {base.get('pct', 0):.0f}%"]
            for c in configs[1:]:
                if time.perf_counter() > deadline:
                    break
                r = time_variant(step, ExtendConfig(*c), 1, ref, mm)
                rows[str(c)] = r
                line.append(f"{c}: {r.get('us', float('nan')):.1f}" if "us" in r else f"{c}: err")
            for s in SPLITS:
                r = time_variant(step, None, s, ref, mm)
                rows[f"splits={s}"] = r
                line.append(f"split{s}: {r.get('us', float('nan')):.1f}")
            bad = [k for k, r in rows.items() if r.get("max_abs_diff", 0) > 2e-2]
            result["cases"][key] = {"case": case, "flops": step.flops, "rows": rows, "wrong": bad}
            print(f"{key}: " + " | ".join(line) + (f" WRONG {bad}" if bad else ""), flush=True)
            del step
            torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat_extend_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
