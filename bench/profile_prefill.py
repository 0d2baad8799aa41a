"""Where a cold long prefill's GPU time goes (issue 18: 32k / 120k against their floors).

    python3 bench/profile_prefill.py --out $OUT [--len 32768] [--chunk 8192]

The engine of ``bench_prefill.py engine`` (llama3.1-8b preset, random weights, ``--chunk``-token
steps, eager), warmed on a prompt of two chunks and a bit, then one cold prompt under
torch.profiler. Prints and writes (prefill_profile_{len}.json) kernel ms per group and the top
kernels, GPU busy vs wall, and the floor's two parts: projections and attention FLOPs at the
matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import floor as fl  # noqa: E402
from kernel_groups import profile_summary  # noqa: E402
from prefill_engine import ttft  # noqa: E402

from radixrt.config import EngineConfig  # noqa: E402
from radixrt.engine.core import EngineCore  # noqa: E402
from radixrt.models.presets import preset_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--len", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=8192)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hw = fl.measure_hardware("cuda", torch.bfloat16)
    cfg = preset_config(args.model)
    shape = fl.ModelShape.from_hf_config(cfg, dtype_bytes=2)
    core = EngineCore(EngineConfig(
        model=args.model, load_format="dummy", device="cuda", dtype="bfloat16",
        kv_cache_tokens=args.len + 4 * args.chunk, max_context_len=args.len + 256,
        chunked_prefill_size=args.chunk, max_prefill_tokens=args.chunk, disable_cuda_graph=True,
        seed=0,
    ))  # fmt: skip
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, int(cfg["vocab_size"]) - 1, (n,), generator=gen).tolist()  # type: ignore[no-any-return]

    ttft(core, "warmup", prompt(min(2 * args.chunk + 100, args.len)))
    core.flush_cache()
    plain = ttft(core, "plain", prompt(args.len))
    core.flush_cache()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        ttft(core, "profiled", prompt(args.len))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    res = profile_summary(prof, wall, top=30)
    f = fl.chunked_prefill_floor(shape, hw, args.len, args.chunk)
    attn = shape.attention_flops(0, args.len)
    res.update(prompt_len=args.len, chunk=args.chunk, ttft_s=plain, floor_s=f["floor_s"],
               attention_floor_ms=attn / hw.matmul_flops * 1e3,
               projection_floor_ms=(f["prefill_flops"] - attn) / hw.matmul_flops * 1e3,
               matmul_tflops=hw.matmul_flops / 1e12)
    (out / f"prefill_profile_{args.len}.json").write_text(json.dumps(res, indent=1))
    print(f"cold {args.len}: ttft {plain:.3f} s (floor {f['floor_s']:.3f} s), profiled wall "
          f"{res['wall_ms']:.0f} ms, GPU busy {res['gpu_busy_ms']:.0f} ms; floors: projections "
          f"{res['projection_floor_ms']:.0f} ms, attention {res['attention_floor_ms']:.0f} ms")
    print("groups", res["groups_ms"])
    for name, ms in res["top_kernels_ms"].items():
        print(f"  {ms:9.2f} ms  {name}")


if __name__ == "__main__":
    main()
