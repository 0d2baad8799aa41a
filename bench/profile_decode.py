"""Where a decode step's GPU time goes (issue 18: decode at 256 x 1k vs its compute-aware floor).

    python3 bench/profile_decode.py --out $OUT [--disable-cuda-graph] [--steps 8] [--batch B --ctx L]

The same engine and batch as ``bench_engine.py --sections decode`` (llama3-8b preset, random
weights, by default 256 requests after 1,024-token prompts), then ``steps`` decode steps under
torch.profiler. Kernel times are summed per step and grouped (GEMM, attention, norm, rope,
activation, sampling, copies, other), and each group is set next to its own floor: GEMMs at
max(FLOPs / matmul rate, weight bytes / copy bandwidth) per projection, attention at KV bytes /
bandwidth. Writes decode_profile_{B}x{L}.json and prints the table and the top kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import measure_ceilings, model_numbers, rand_prompts  # noqa: E402
from kernel_groups import group_of  # noqa: E402

from radixrt import Engine, SamplingParams  # noqa: E402
from radixrt.engine.warmup import freeze_startup_objects  # noqa: E402
from radixrt.models.args import ModelArgs  # noqa: E402
from radixrt.models.presets import preset_config  # noqa: E402


def gemm_floor_ms(args: ModelArgs, batch: int, ceil: dict[str, float]) -> float:
    """Per projection max(compute, weight read), all layers, plus the lm_head."""
    h, i = args.hidden_size, args.intermediate_size
    shapes = [(h, args.q_size + 2 * args.kv_size), (args.q_size, h), (h, 2 * i), (i, h)]
    total = 0.0
    for k, n in shapes:
        total += args.num_layers * max(2 * batch * k * n / ceil["matmul_flops"],
                                       2 * k * n / ceil["copy_bw_Bps"])
    v = args.vocab_size
    total += max(2 * batch * h * v / ceil["matmul_flops"], 2 * h * v / ceil["copy_bw_Bps"])
    return total * 1e3


def host_profile(core: Any, steps: int, path: Path) -> None:
    """``steps`` decode steps under cProfile: where the host's part of a step goes."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        core.step()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    buf.write(f"{steps} decode steps under cProfile: {(time.perf_counter() - t) * 1e3 / steps:.2f} "
              "ms/step\n")
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(40)
    path.write_text(buf.getvalue())
    print(buf.getvalue()[:200])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=1024, help="prompt tokens per request")
    ap.add_argument("--cprofile", action="store_true",
                    help="also run the steps under cProfile: decode_cprofile.txt (host time)")
    a = ap.parse_args()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ceil = measure_ceilings("cuda")
    margs = ModelArgs.from_hf_config(preset_config(a.preset))
    nums = model_numbers(margs)
    batch, ctx = a.batch, a.ctx
    eng = Engine(a.preset, load_format="dummy", device="cuda", dtype="bfloat16", page_size=16,
                 max_running_requests=256, chunked_prefill_size=8192, max_prefill_tokens=16384,
                 mem_fraction=0.80, disable_cuda_graph=a.disable_cuda_graph)
    freeze_startup_objects()  # as the server's worker process does after start-up
    core = eng.core
    p = SamplingParams(temperature=0, max_new_tokens=2 * a.steps + 40, ignore_eos=True)
    for n, ids in enumerate(rand_prompts(batch, ctx, margs.vocab_size, 1)):
        core.add_request(f"d{n}", ids, p)
    while any(s.in_prefill for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    for _ in range(8):  # warm: graphs captured, allocator settled
        core.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):  # unprofiled: the step's real wall time (host + GPU)
        core.step()
    torch.cuda.synchronize()
    wall_plain_ms = (time.perf_counter() - t) * 1e3 / a.steps
    if a.cprofile:
        host_profile(core, a.steps, out_dir / "decode_cprofile.txt")
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            core.step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) * 1e3 / a.steps
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if dev_us and ev.key and not ev.key.startswith(("ProfilerStep", "cuda", "aten::")):
            kernels[ev.key] = kernels.get(ev.key, 0.0) + dev_us / 1e3 / a.steps
    groups: dict[str, float] = {}
    for name, ms in kernels.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    kv_read = batch * (ctx + 24) * nums["kv_bytes_per_token"]
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "graphs": not a.disable_cuda_graph,
        "batch": batch, "ctx": ctx,
        "wall_ms_per_step": wall_plain_ms, "wall_ms_per_step_profiled": wall_ms, "kernel_ms_per_step": sum(kernels.values()),
        "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "gemm_floor_ms": gemm_floor_ms(margs, batch, ceil),
        "attention_floor_ms": kv_read / ceil["copy_bw_Bps"] * 1e3, **ceil,
        "top_kernels_ms": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:30]),
    }
    (out_dir / f"decode_profile_{batch}x{ctx}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "top_kernels_ms"}, indent=1))
    for name, ms in res["top_kernels_ms"].items():
        print(f"{ms:8.3f} ms  {group_of(name):10s} {name[:110]}")
    while core.has_work():
        core.step()


if __name__ == "__main__":
    main()
