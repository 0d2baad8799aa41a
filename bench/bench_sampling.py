"""Cost of sampling a batch on the GPU: top-p by full sort (the sampler's former path) vs the
sort-free Triton filter, and a whole ``Sampler.draw`` with and without top-p. CUDA only.

    python bench/bench_sampling.py [--out DIR] [--batch 256] [--vocab 152064]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radixrt.engine.sampler import Sampler, SamplerRow  # noqa: E402
from radixrt.kernels.top_p import top_p_filter  # noqa: E402
from radixrt.sampling_params import SamplingParams  # noqa: E402


def sort_top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sx, order = x.sort(dim=-1, descending=True, stable=True)
    probs = torch.softmax(sx, dim=-1)
    sx = sx.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=152064)
    a = ap.parse_args()
    dev = torch.device("cuda")
    x = torch.randn(a.batch, a.vocab, device=dev) * 3
    p = torch.full((a.batch,), 0.9, device=dev)
    agree = float(((sort_top_p(x, p) == float("-inf")) == (top_p_filter(x, p) == float("-inf")))
                  .float().mean())
    res = {"device": torch.cuda.get_device_name(), "batch": a.batch, "vocab": a.vocab,
           "kept_mask_agreement": agree,
           "top_p_sort_ms": do_bench(lambda: sort_top_p(x, p), return_mode="median"),
           "top_p_kernel_ms": do_bench(lambda: top_p_filter(x, p), return_mode="median")}
    for pivots, block, warps in ((4, 1024, 8), (4, 2048, 8), (4, 2048, 16), (4, 4096, 16),
                                 (8, 1024, 16), (2, 4096, 16)):
        res[f"top_p_kernel_{pivots}pivots_block{block}_warps{warps}_ms"] = do_bench(
            lambda pivots=pivots, block=block, warps=warps: top_p_filter(x, p, pivots, block, warps),
            return_mode="median")
    sampler = Sampler()

    def rows(params: SamplingParams) -> list[SamplerRow]:
        return [SamplerRow(params, None, [], []) for _ in range(a.batch)]

    for name, params in (("draw_temperature_only_ms", SamplingParams(temperature=0.8)),
                         ("draw_top_p_0.9_ms", SamplingParams(temperature=0.8, top_p=0.9)),
                         ("draw_top_k_50_ms", SamplingParams(temperature=0.8, top_k=50))):
        r = rows(params)
        res[name] = do_bench(lambda r=r: sampler.draw(x, r).tokens, return_mode="median")
    print(json.dumps(res, indent=1))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench_sampling.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
