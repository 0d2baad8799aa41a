"""Attention GPU time of chat-like mixed steps with the decode rows cut out to the decode kernel
(TritonAttentionBackend ``split_mixed_decode``) vs all rows in the extend kernel.

    python3 bench/mixed_split_probe.py --out $OUT

Each case: ``decodes`` decode rows over prefixes drawn from 500-3,500 tokens, then ``extends``
requests of ``new`` tokens over a ``prefix``-token cache, Llama-3-8B attention shapes (32 / 8
heads, head_dim 128, bf16, page 16, random pages). The backend's forward (K/V store + attention)
runs ``reps`` times per mode under torch.profiler; the summed kernel time per call is reported.
Writes mixed_split_probe.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radixrt.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from radixrt.cache.kv_pool import KVPool  # noqa: E402
from radixrt.engine.batch import build_forward_batch  # noqa: E402

HQ, HKV, HD, PAGE = 32, 8, 128, 16
CASES = {  # name: (decode rows, extend requests, new tokens each, their prefix)
    "14 dec + 2 x 400 over 2k": (14, 2, 400, 2048),
    "14 dec + 4 x 400 over 1k": (14, 4, 400, 1024),
    "12 dec + 1 x 1500 over 3k": (12, 1, 1500, 3072),
    "30 dec + 2 x 400 over 2k": (30, 2, 400, 2048),
}


def gpu_us(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages() if e.device_time_total > 0
                and e.key != "ProfilerStep*")
    return total / reps


def run_case(decodes: int, extends: int, new: int, prefix: int, reps: int) -> dict[str, float]:
    rng = random.Random(0)
    prefixes = [rng.randrange(500, 3500) for _ in range(decodes)] + [prefix] * extends
    news = [1] * decodes + [new] * extends
    pages = [-(-(p + n) // PAGE) for p, n in zip(prefixes, news)]
    perm = (torch.randperm(sum(pages) + 2) + 1).tolist()
    tables = [perm[sum(pages[:i]): sum(pages[: i + 1])] for i in range(len(pages))]
    pool = KVPool(num_layers=1, num_pages=sum(pages) + 2, page_size=PAGE, num_kv_heads=HKV,
                  head_dim=HD, dtype=torch.bfloat16, device="cuda")
    pool.k(0).normal_()
    pool.v(0).normal_()
    batch = build_forward_batch(new_token_ids=[[1] * n for n in news], prefix_lens=prefixes,
                                page_tables=tables, page_size=PAGE, device="cuda")
    t = batch.num_tokens
    qkv = torch.randn(t, (HQ + 2 * HKV) * HD, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([HQ * HD, HKV * HD, HKV * HD], dim=-1)
    q, k, v = q.view(t, HQ, HD), k.view(t, HKV, HD), v.view(t, HKV, HD)
    res: dict[str, float] = {}
    outs = {}
    for split in (False, True):
        backend = TritonAttentionBackend(HQ, HKV, HD, HD**-0.5, device="cuda",
                                         max_batch_size=256, split_mixed_decode=split)
        backend.prepare(batch)
        assert (backend.mixed_split is not None) == split
        res["split" if split else "extend_only"] = gpu_us(
            lambda b=backend: b.forward(0, q, k, v, pool, batch), reps)
        outs[split] = backend.forward(0, q, k, v, pool, batch).float()
    res["max_abs_diff"] = float((outs[True] - outs[False]).abs().max())
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    rows = {}
    for name, case in CASES.items():
        r = run_case(*case, a.reps)
        rows[name] = r
        print(f"{name}: extend only {r['extend_only']:.1f} us, split {r['split']:.1f} us "
              f"({r['split'] / r['extend_only']:.2f}x), max |diff| {r['max_abs_diff']:.3g}",
              flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed_split_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
