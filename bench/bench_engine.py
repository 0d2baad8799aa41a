"""GPU engine benchmarks for issue 6 (8B shape, random weights, bf16), each next to its floor.

    python bench/bench_engine.py --out $OUT [--sections ceilings,decode,prefill,e2e,agree,hf]

- ceilings: measured device copy bandwidth (read + write bytes) and bf16 matmul rate.
- decode:  batch 256 x 1k-token context, per-step wall time vs (weights + KV bytes) / bandwidth;
           GPU idle time between steps = wall time - GPU time of the forward.
- decode32k: batch 64 x 32k-token context, the same measure, on its own engine (32k context). The
           64 prompts share a 32k stem (prefilled once, then cache hits) so their KV fits; every
           step still reads 64 x 32k tokens of KV. Host work per step must not grow with context.
- prefill: 8 x 1024-token prompts in one step, model FLOPs / time vs the matmul rate.
- e2e:     batch 128, 512 in / 128 out, end-to-end time vs the workload floor.
- agree:   64 prompts x 64 greedy tokens, prefix cache on vs off (token agreement).
- hf:      transformers generate on the same shape, prompts and lengths (the baseline).
- det_decode, det_prefill, det_e2e, det_agree: the same on a second engine with deterministic
           inference (batch-invariant kernels); keys prefixed det_.
Writes engine.json under --out and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from radixrt import Engine, SamplingParams
from radixrt.cache.prefix_cache import NoPrefixCache
from radixrt.engine.warmup import freeze_startup_objects
from radixrt.models.args import ModelArgs
from radixrt.models.presets import preset_config


def measure_ceilings(device: str) -> dict[str, float]:
    n = 1 << 30  # 1 GiB of bf16 values x2 bytes
    a = torch.empty(n // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * a.numel() * 2 * reps / (time.perf_counter() - t)
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        x @ y
    torch.cuda.synchronize()
    flops = 2 * m**3 * 10 / (time.perf_counter() - t)
    return {"copy_bw_Bps": bw, "matmul_flops": flops}


def model_numbers(args: ModelArgs) -> dict[str, float]:
    h, i, layers, v = args.hidden_size, args.intermediate_size, args.num_layers, args.vocab_size
    per_layer = h * (args.q_size + 2 * args.kv_size) + args.q_size * h + 3 * h * i
    params = layers * per_layer + 2 * v * h
    kv_bytes_per_token = 2 * layers * args.num_kv_heads * args.head_dim * 2
    return {"params": params, "weight_bytes": params * 2, "kv_bytes_per_token": kv_bytes_per_token,
            "matmul_params": layers * per_layer + v * h}  # embedding lookup is no matmul


def prefill_flops(nums: dict[str, float], args: ModelArgs, lens: list[int]) -> float:
    # 2 FLOPs per weight per token, plus causal attention (QK^T and PV: 2 * 2 * L^2/2 * d per head).
    attn = sum(2 * n * n * args.head_dim * args.num_heads * args.num_layers for n in lens)
    return 2 * nums["matmul_params"] * sum(lens) + attn


def rand_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]


class GpuTimer:
    """Wraps runner.forward with CUDA events to split step time into GPU work and idle."""

    def __init__(self, runner: Any) -> None:
        self.runner, self.inner = runner, runner.forward
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        runner.forward = self

    def __call__(self, batch: Any) -> torch.Tensor:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = self.inner(batch)
        e.record()
        self.events.append((s, e))
        return out  # type: ignore[no-any-return]

    def gpu_ms(self) -> list[float]:
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in self.events]


def run_decode(eng: Engine, nums: dict[str, float], ceil: dict[str, float], args: ModelArgs) -> dict[str, Any]:
    batch, ctx, steps = 256, 1024, 24
    core = eng.core
    prompts = rand_prompts(batch, ctx, args.vocab_size, 1)
    p = SamplingParams(temperature=0, max_new_tokens=steps + 8, ignore_eos=True)
    for i, ids in enumerate(prompts):
        core.add_request(f"d{i}", ids, p)
    while any(s.in_prefill for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    return time_decode_steps(core, "decode", batch, ctx, steps, nums, ceil)


def time_decode_steps(core: Any, name: str, batch: int, ctx: int, steps: int,
                      nums: dict[str, float], ceil: dict[str, float]) -> dict[str, Any]:
    """Time ``steps`` decode steps of a batch already past prefill, then drain it; the floor
    reads the weights once and every request's KV (``ctx`` tokens, growing) per step."""
    timer = GpuTimer(core.runner)
    # No sync inside the loop: with overlap, step N+1 is queued before step N's tokens are read.
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        core.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) * 1e3 / steps
    gpu = timer.gpu_ms()
    core.runner.forward = timer.inner
    while core.has_work():
        core.step()
    kv_read = batch * (ctx + steps / 2) * nums["kv_bytes_per_token"]
    floor_ms = (nums["weight_bytes"] + kv_read) / ceil["copy_bw_Bps"] * 1e3
    g = sum(gpu) / len(gpu)
    return {f"{name}_step_ms": wall_ms, f"{name}_gpu_ms": g, f"{name}_idle_ms": wall_ms - g,
            f"{name}_floor_ms": floor_ms, f"{name}_vs_floor": wall_ms / floor_ms}


def run_decode_long(a: argparse.Namespace, nums: dict[str, float], ceil: dict[str, float],
                    args: ModelArgs, batch: int = 64, ctx: int = 32768, steps: int = 16,
                    device: str = "cuda") -> dict[str, Any]:
    eng = Engine(a.preset, load_format="dummy", device=device, dtype="bfloat16", page_size=16,
                 max_running_requests=256, chunked_prefill_size=8192, max_prefill_tokens=16384,
                 mem_fraction=0.80, disable_cuda_graph=a.disable_cuda_graph,
                 attention_backend=a.attention_backend, max_context_len=ctx + 256)
    core = eng.core
    rng = random.Random(3)
    stem = [rng.randrange(10, args.vocab_size - 10) for _ in range(ctx - 32)]
    # The stem alone first, so the 64 requests below hit it instead of racing to compute it.
    core.add_request("stem", stem, SamplingParams(temperature=0, max_new_tokens=1))
    while core.has_work():
        core.step()
    p = SamplingParams(temperature=0, max_new_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        core.add_request(f"l{i}", stem + [rng.randrange(10, args.vocab_size - 10) for _ in range(32)], p)
    while any(s.in_prefill for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    assert len(core.scheduler.running) == batch, "all 64 long requests must decode together"
    out = time_decode_steps(core, "decode32k", batch, ctx, steps, nums, ceil)
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run_prefill(eng: Engine, nums: dict[str, float], ceil: dict[str, float], args: ModelArgs) -> dict[str, Any]:
    core = eng.core
    times = []
    for rep in range(4):
        eng.flush_cache()
        for i, ids in enumerate(rand_prompts(8, 1024, args.vocab_size, 100 + rep)):
            core.add_request(f"p{rep}-{i}", ids, SamplingParams(temperature=0, max_new_tokens=1))
        torch.cuda.synchronize()
        t = time.perf_counter()
        core.step()  # all 8 prompts in one step (max_prefill_tokens >= 8192)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        while core.has_work():
            core.step()
    t = sorted(times[1:])[1]
    flops = prefill_flops(nums, args, [1024] * 8)
    return {"prefill_s": t, "prefill_tflops": flops / t / 1e12,
            "prefill_mfu_vs_matmul": flops / t / ceil["matmul_flops"]}


def run_e2e(eng: Engine, nums: dict[str, float], ceil: dict[str, float], args: ModelArgs) -> dict[str, Any]:
    prompts = rand_prompts(128, 512, args.vocab_size, 7)
    p = SamplingParams(temperature=0, max_new_tokens=128, ignore_eos=True)
    eng.flush_cache()
    # Warm-up over the same prompts (prefill shapes, mixed steps, growing decode batches), so
    # one-time Triton compiles and pinned-buffer growth stay out of the timed run.
    eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    eng.flush_cache()
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = eng.generate(prompts, p)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    assert all(len(o.token_ids) == 128 for o in outs), "every request must produce 128 tokens"
    pf = prefill_flops(nums, args, [512] * 128) / ceil["matmul_flops"]
    kv = sum(128 * (512 + j) for j in range(128)) * nums["kv_bytes_per_token"]
    dec = (128 * nums["weight_bytes"] + kv) / ceil["copy_bw_Bps"]
    return {"e2e_s": dt, "e2e_out_tok_s": 128 * 128 / dt, "e2e_floor_s": pf + dec,
            "e2e_vs_floor": dt / (pf + dec)}


def run_agree(eng: Engine, args: ModelArgs) -> dict[str, Any]:
    """Cache on vs off at equal batch composition (the same engine with the tree switched off).

    Where greedy tokens diverge, the step's top-2 logprobs tell whether it was a near-tie that
    bf16 rounding may flip (a gap under ``TIE``) or a real disagreement."""
    tie = 0.05
    rng = random.Random(5)
    stems = rand_prompts(8, 256, args.vocab_size, 9)
    prompts = [stems[g] + [rng.randrange(10, args.vocab_size - 10) for _ in range(64)]
               for g in range(8) for _ in range(8)]
    p = SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True, logprobs=True,
                       top_logprobs=2)
    memory = eng.core.scheduler.memory
    cache = memory.cache
    eng.flush_cache()
    on = eng.generate(prompts, p)
    hits = sum(o.cached_tokens for o in on)
    eng.flush_cache()
    memory.cache = NoPrefixCache(memory.allocator, memory.page_size)
    try:
        off = eng.generate(prompts, p)
    finally:
        memory.cache = cache
    same = sum(a.token_ids == b.token_ids for a, b in zip(on, off))
    ties, lp_diffs, first_div = 0, [], []
    for a, b in zip(on, off):
        d = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        upto = len(a.token_ids) if d is None else d
        lp_diffs += [abs(x - y) for x, y in zip((a.logprobs or [])[:upto], (b.logprobs or [])[:upto])]
        if d is not None:
            first_div.append(d)
            top = (a.outputs[0].top_logprobs or [])[d]
            if len(top) == 2 and abs(top[0][1] - top[1][1]) < tie:
                ties += 1
    n_div = len(prompts) - same
    return {"agree_identical_frac": same / len(prompts), "agree_cached_tokens": hits,
            "agree_divergences": n_div, "agree_divergences_at_near_ties": ties,
            "agree_median_first_divergence": sorted(first_div)[len(first_div) // 2] if first_div else None,
            "agree_max_logprob_diff_before_divergence": max(lp_diffs) if lp_diffs else 0.0,
            "agree_mean_logprob_diff_before_divergence": sum(lp_diffs) / max(len(lp_diffs), 1)}


def run_hf(args_cfg: dict[str, Any], ceil: dict[str, float]) -> dict[str, Any]:
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in args_cfg.items() if k != "architectures"})
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16).eval()
    ids = torch.tensor(rand_prompts(128, 512, cfg.vocab_size, 7), device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.generate(ids[:8, :64], attention_mask=mask[:8, :64], max_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=128, min_new_tokens=128,
                             do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    assert out.shape[1] == 512 + 128
    return {"hf_e2e_s": dt, "hf_out_tok_s": 128 * 128 / dt}


def run_engine_sections(a: argparse.Namespace, sections: set[str], res: dict[str, Any],
                        nums: dict[str, float], ceil: dict[str, float], margs: ModelArgs,
                        out_dir: Path, *, deterministic: bool) -> None:
    """The engine sections on one engine; with deterministic inference the sections are named
    ``det_<name>`` and their result keys get the same prefix."""
    prefix = "det_" if deterministic else ""
    wanted = {s[len(prefix):] for s in sections if s.startswith(prefix)} if deterministic else sections
    if not wanted & {"decode", "prefill", "e2e", "agree"}:
        return
    t = time.perf_counter()
    eng = Engine(a.preset, load_format="dummy", device="cuda", dtype="bfloat16", page_size=16,
                 max_running_requests=256, chunked_prefill_size=8192, max_prefill_tokens=16384,
                 mem_fraction=0.80, disable_cuda_graph=a.disable_cuda_graph,
                 attention_backend=a.attention_backend, deterministic_inference=deterministic)
    res[prefix + "engine_start_s"] = time.perf_counter() - t
    freeze_startup_objects()  # as the server's worker process does after start-up
    res[prefix + "kv_pages"] = eng.stats().total_pages
    print(f"{prefix}engine up in {res[prefix + 'engine_start_s']:.1f}s, "
          f"{res[prefix + 'kv_pages']} pages", flush=True)
    steps: list[tuple[str, Any]] = [("decode", run_decode), ("prefill", run_prefill), ("e2e", run_e2e)]
    for name, fn in steps:
        if name in wanted:
            got = fn(eng, nums, ceil, margs)
            res.update({prefix + k: v for k, v in got.items()})
            print(prefix + name, got, flush=True)
            (out_dir / "engine.json").write_text(json.dumps(res, indent=2))
    if "agree" in wanted:
        got = run_agree(eng, margs)
        res.update({prefix + k: v for k, v in got.items()})
        print(prefix + "agree", got, flush=True)
    del eng
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--sections", default="ceilings,decode,prefill,e2e,agree,hf")
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--attention-backend", default="auto", help="auto (Triton) or flashinfer")
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "preset": a.preset,
                           "attention_backend": a.attention_backend}
    ceil = measure_ceilings("cuda")
    res.update(ceil)
    cfg = preset_config(a.preset)
    margs = ModelArgs.from_hf_config(cfg)
    nums = model_numbers(margs)
    res.update(nums)
    for deterministic in (False, True):
        run_engine_sections(a, sections, res, nums, ceil, margs, out_dir, deterministic=deterministic)
    if "decode32k" in sections:
        got = run_decode_long(a, nums, ceil, margs)
        res.update(got)
        print("decode32k", got, flush=True)
        (out_dir / "engine.json").write_text(json.dumps(res, indent=2))
    if "hf" in sections:
        res.update(run_hf(cfg, ceil))
        res["speedup_vs_hf"] = res["hf_e2e_s"] / res["e2e_s"] if "e2e_s" in res else None
    (out_dir / "engine.json").write_text(json.dumps(res, indent=2))
    for k, v in res.items():
        print(f"{k:36s} {v:.4g}" if isinstance(v, float) else f"{k:36s} {v}")


if __name__ == "__main__":
    main()
