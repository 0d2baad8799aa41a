"""The engine half of bench/bench_prefill.py: cold prefill of long prompts (time to first token)
against ``floor.chunked_prefill_floor``, with the paged kernel (the sweep's best config), the
hybrid (new x new on torch's SDPA, when the sweep found it correct) and the previous kernel."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench import floor as fl
from bench.bench_prefill import HD, HKV, HQ, write
from radixrt.kernels import extend_configs
from radixrt.kernels.extend_baseline import extend_attention_baseline
from radixrt.kernels.extend_configs import ExtendConfig


def ttft(core: Any, rid: str, prompt: list[int]) -> float:
    from radixrt.sampling_params import SamplingParams

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    core.add_request(rid, prompt, SamplingParams(max_new_tokens=1, temperature=0.0,
                                                 ignore_eos=True))
    first = None
    while core.has_work():
        for d in core.step():
            if d.rid == rid and d.new_token_ids and first is None:
                first = time.perf_counter() - t0
    assert first is not None, f"{rid} produced no token"
    return first


def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    from radixrt.attention import triton_backend
    from radixrt.config import EngineConfig
    from radixrt.engine.core import EngineCore
    from radixrt.models.presets import preset_config

    dev = torch.device(args.device)
    lens = [int(x) for x in args.lens.split(",")]
    old_lens = [int(x) for x in args.old_lens.split(",") if x]
    res: dict[str, Any] = {"model": args.model, "chunk": args.chunk, "lens": lens}
    hybrid_ok = False
    if args.sweep_json and Path(args.sweep_json).exists():
        sweep = json.loads(Path(args.sweep_json).read_text())
        best = sweep.get("best_overall")
        hybrid_ok = all(r.get("hybrid", {}).get("correct", False)
                        for r in sweep.get("shapes", {}).values()) and bool(sweep.get("shapes"))
        if best and dev.type == "cuda":
            key = (HD, HQ // HKV, torch.cuda.get_device_capability(dev)[0])
            extend_configs.TABLE[key] = ExtendConfig(*best["config"])
            extend_configs.LONG_TABLE[key] = extend_configs.TABLE[key]  # the winner everywhere
            extend_configs.USE_NEW_KV = best.get("mode", "paged") != "paged"
            res["config"], res["mode"] = best["config"], best.get("mode", "paged")
    res["use_new_kv"] = extend_configs.USE_NEW_KV
    res["config_used"] = list(extend_configs.default_config(HD, HQ // HKV, dev, 2, args.chunk).as_tuple())
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hw = fl.measure_hardware(args.device, dtype)
    cfg = preset_config(args.model)
    shape = fl.ModelShape.from_hf_config(cfg, dtype_bytes=torch.finfo(dtype).bits // 8)
    res["matmul_tflops"], res["copy_gbs"] = hw.matmul_flops / 1e12, hw.copy_bandwidth / 1e9
    longest = max(lens + old_lens)
    core = EngineCore(EngineConfig(
        model=args.model, load_format="dummy", device=args.device, dtype=str(dtype).split(".")[-1],
        kv_cache_tokens=longest + 4 * args.chunk, max_context_len=longest + 256,
        chunked_prefill_size=args.chunk, max_prefill_tokens=args.chunk, disable_cuda_graph=True,
        seed=0,
    ))  # fmt: skip
    vocab = int(cfg["vocab_size"])
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, vocab - 1, (n,), generator=gen).tolist()  # type: ignore[no-any-return]

    # The last chunk's prefix tiles on page runs (extend_runs.prefix_tile_lists): how many of
    # them loaded as TMA boxes of pool rows rather than by gather.
    from radixrt.kernels import extend_runs

    last_lists: list[tuple[torch.Tensor, torch.Tensor]] = []
    tile_lists = extend_runs.prefix_tile_lists

    def probe(table: torch.Tensor, rows: torch.Tensor, prefix: torch.Tensor, page: int,
              block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = tile_lists(table, rows, prefix, page, block_n)
        last_lists[:] = [(out[2], prefix // block_n)]
        return out

    extend_runs.prefix_tile_lists = probe  # type: ignore[assignment]

    def timed(tag: str, n: int) -> dict[str, Any]:
        core.flush_cache()
        last_lists.clear()
        t = ttft(core, f"{tag}{n}", prompt(n))
        f = fl.chunked_prefill_floor(shape, hw, n, args.chunk)
        row = {"kernel": tag, "prompt_len": n, "ttft_s": t, "floor_s": f["floor_s"],
               "flops_floor_s": f["flops_s"], "vs_floor": t / f["floor_s"],
               "vs_flops_floor": t / f["flops_s"],
               "model_tflops": f["prefill_flops"] / t / 1e12,
               "last_chunk_run_tiles_of": ([t.tolist() for t in last_lists[0]] if last_lists
                                           else None)}
        print(f"cold prefill {n} ({tag} kernel): {t:.3f} s, floor {f['floor_s']:.3f} s "
              f"({row['vs_floor']:.2f}x), all-FLOPs floor {f['flops_s']:.3f} s, last chunk's "
              f"prefix tiles [on page runs], [of]: {row['last_chunk_run_tiles_of']}", flush=True)
        return row

    ttft(core, "warmup", prompt(min(2 * args.chunk + 100, longest)))  # compiles every chunk shape
    res["runs"] = [timed("new", n) for n in lens]
    write(args.out, "prefill_engine.json", res)
    paged_lens = [int(x) for x in args.paged_lens.split(",") if x]
    if extend_configs.USE_NEW_KV and paged_lens:  # the same tiles, every key through the table
        extend_configs.USE_NEW_KV = False
        try:
            res["runs"] += [timed("paged", n) for n in paged_lens]
        finally:
            extend_configs.USE_NEW_KV = True
        write(args.out, "prefill_engine.json", res)
    if hybrid_ok:  # the same with every chunk's new x new on torch's SDPA
        extend_configs.DENSE_NEW_MIN_TOKENS = args.dense_new_min
        try:
            ttft(core, "warmup-hybrid", prompt(min(2 * args.chunk + 100, longest)))
            res["runs"] += [timed("hybrid", n) for n in lens]
        except Exception as exc:  # noqa: BLE001 - report, keep the other runs
            res["hybrid_error"] = repr(exc)[:300]
            print("hybrid engine run failed:", res["hybrid_error"], flush=True)
        finally:
            extend_configs.DENSE_NEW_MIN_TOKENS = None
        write(args.out, "prefill_engine.json", res)
    if getattr(args, "dense_extend_min", 0):  # whole long extends (prefix gathered) on SDPA
        extend_configs.DENSE_EXTEND_MIN_TOKENS = args.dense_extend_min
        try:
            ttft(core, "warmup-dense", prompt(min(2 * args.chunk + 100, longest)))
            res["runs"] += [timed("dense", n) for n in lens]
        except Exception as exc:  # noqa: BLE001 - report, keep the other runs
            res["dense_error"] = repr(exc)[:300]
            print("dense engine run failed:", res["dense_error"], flush=True)
        finally:
            extend_configs.DENSE_EXTEND_MIN_TOKENS = None
        write(args.out, "prefill_engine.json", res)
    if old_lens:
        new_fn = triton_backend.extend_attention
        def old_kernel(*args: Any, max_seq_len: int | None = None, k_new: Any = None,
                       v_new: Any = None, **kw: Any) -> Any:
            # The previous kernel never splits KV and reads every key from the pool, so the
            # length and the dense new-token K/V the backend passes are unused.
            return extend_attention_baseline(*args, **kw)

        triton_backend.extend_attention = old_kernel  # type: ignore[assignment]
        try:
            ttft(core, "warmup-old", prompt(min(2 * args.chunk + 100, longest)))
            res["runs"] += [timed("old", n) for n in old_lens]
        finally:
            triton_backend.extend_attention = new_fn  # type: ignore[assignment]
    write(args.out, "prefill_engine.json", res)
    return res
