"""radixrt benchmark CLI: prefix-sharing workloads, cache on/off, HF baseline, hardware floor.

    python -m bench.run_bench --workload gsp,chat --model llama-tiny --load-format dummy \
        --compare-cache --baseline hf --scale 0.05 --len-scale 0.1 --out bench/results/smoke

Writes under --out: one JSON per run (<workload>_<variant>.json), summary.json, summary.md (tables
+ issue 7 targets) and PNG plots. Variants: radix (cache on), nocache (cache off), hf (transformers
generate). Offline mode imports nothing from radixrt.server.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `radixrt` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import floor as floor_mod  # noqa: E402
from bench.metrics import (  # noqa: E402
    compute_metrics,
    optimal_hit_rate,
    optimal_hits,
    records_stream,
    ttft_by_turn,
)
from bench.offline import RunOutput  # noqa: E402
from bench.report import markdown, plots  # noqa: E402
from bench.workloads import WORKLOADS, Workload, expected_stream, make_workload  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="gsp", help=f"one or more of {','.join(WORKLOADS)}, or all")
    p.add_argument("--mode", choices=("offline", "online"), default="offline")
    p.add_argument("--model", default="llama-tiny", help="HF directory or preset (with --load-format dummy)")
    p.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "gguf", "dummy"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--no-cache", action="store_true", help="run with the prefix cache off only")
    cache.add_argument("--compare-cache", action="store_true", help="run cache on and cache off")
    p.add_argument("--baseline", choices=("hf",), default=None)
    p.add_argument("--variants", default=None,
                   help="explicit comma list of radix,nocache,hf (overrides the flags above)")
    p.add_argument("--workload-scale", action="append", default=[], metavar="NAME=S",
                   help="per-workload --scale override, e.g. random=0.5 (repeatable)")
    p.add_argument("--workload-len-scale", action="append", default=[], metavar="NAME=S",
                   help="per-workload --len-scale override (repeatable)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild summary.md and plots from the run JSONs already in --out")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--hf-max-requests", type=int, default=None,
                   help="HF baseline runs only the first N requests (whole conversations)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies request counts")
    p.add_argument("--len-scale", type=float, default=1.0, help="multiplies token lengths")
    p.add_argument("--chat-output", choices=("short", "long"), default="short")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--host-kv-cache-tokens", type=int, default=0,
                   help="host KV tier behind the GPU pool, in tokens (0 = off)")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="prompt tokens per step (engine default when unset; also caps the chunk)")
    p.add_argument("--mem-fraction", type=float, default=0.85)
    p.add_argument("--max-running-requests", type=int, default=256)
    p.add_argument("--schedule-policy", choices=("lpm", "fcfs"), default="lpm")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<time>)")
    p.add_argument("--tag", default=None,
                   help="name this invocation's summary summary-<tag>.* (to merge several later)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="run each engine workload once more under torch.profiler (CUDA) and write "
                   "<workload>_<variant>_profile.json: kernel time per group, GPU busy vs wall")
    p.add_argument("--cprofile", action="store_true",
                   help="run each engine workload once more under cProfile and write "
                   "<workload>_<variant>_cprofile.txt (host time by function)")
    p.add_argument("--no-warmup", action="store_true",
                   help="time cold kernels: neither the engine's start-up warm-up nor this script's")
    p.add_argument("--piecewise-max-tokens", type=int, default=None,
                   help="EngineConfig.piecewise_cuda_graph_max_tokens (0: mixed steps eager; "
                   "default: the engine's)")
    p.add_argument("--prefill-attention", default="triton", choices=("triton", "flashinfer"),
                   help="EngineConfig.prefill_attention (flashinfer: FA3 paged prefill)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no new run after this many seconds (partial results are kept)")
    p.add_argument("--hw-matmul-n", type=int, default=None)
    p.add_argument("--hw-copy-mib", type=int, default=None)
    # online
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--endpoint", choices=("generate", "completions"), default="generate")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson req/s")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--online-variant", choices=("radix", "nocache"), default="radix",
                   help="label for the server's run (the server decides whether its cache is on)")
    return p.parse_args(argv)


def model_config(model: str) -> dict[str, Any]:
    path = Path(model).expanduser()
    if path.is_dir():
        return dict(json.loads((path / "config.json").read_text()))
    from radixrt.models.presets import preset_config

    return preset_config(model)


def run_dtype(args: argparse.Namespace) -> torch.dtype:
    from radixrt.config import EngineConfig

    return EngineConfig(device=args.device, dtype=args.dtype).torch_dtype


def build_floors(workloads: list[Workload], shape: floor_mod.ModelShape, hw: floor_mod.Hardware,
                 args: argparse.Namespace, kv_tokens: int | None) -> dict[str, dict[str, Any]]:
    out = {}
    for w in workloads:
        stream = expected_stream(w)
        computed = [(p, p + [-(10**9)] * (o - 1)) for p, o in stream]  # placeholders, never shared
        hits = optimal_hits(computed, args.page_size)
        shapes = [(len(p), o) for p, o in stream]
        reqs = [floor_mod.RequestShape(p, 0, o) for p, o in shapes]
        batch = floor_mod.decode_batch(reqs, max_running=args.max_running_requests,
                                       streams=len(w.conversations), kv_tokens=kv_tokens)
        out[w.name] = floor_mod.workload_floors(shape, hw, shapes, hits, batch)
    return out


def result(w: Workload, variant: str, out: RunOutput, args: argparse.Namespace,
           floors: dict[str, Any] | None) -> dict[str, Any]:
    m = compute_metrics(out.records, out.duration_s)
    return {
        "workload": w.name, "variant": variant, "mode": args.mode, "model": args.model,
        "device": args.device, "scale": args.scale, "len_scale": args.len_scale,
        "host_kv_cache_tokens": args.host_kv_cache_tokens if variant == "radix" else 0,
        "workload_params": dict(w.params), "num_requests": w.num_requests,
        "dropped_turns": out.dropped_turns, "metrics": m.to_dict(),
        "optimal_hit_rate": optimal_hit_rate(records_stream(out.records), args.page_size),
        "ttft_by_turn": ttft_by_turn(out.records) if w.multi_turn else {},
        "peak_pages_used": out.peak_pages_used, "peak_pages_pinned": out.peak_pages_pinned,
        "total_pages": out.total_pages, "engine": out.engine, "floor": floors,
    }


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        print(f"GPU memory still allocated: {torch.cuda.memory_allocated() / 2**30:.2f} GiB",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(WORKLOADS) if args.workload == "all" else args.workload.split(",")
    for n in names:
        if n not in WORKLOADS:
            raise SystemExit(f"unknown workload {n!r}; choose from {', '.join(WORKLOADS)} or all")
    out_dir = Path(args.out or f"bench/results/{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out = str(out_dir)
    # `timeout` sends SIGTERM: finish with the report of what ran instead of dying silently.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.perf_counter()
    if args.report_only:
        return _report_only(out_dir)
    cfg = model_config(args.model)
    dtype = run_dtype(args)
    vocab = int(cfg["vocab_size"])
    kw: dict[str, Any] = {"output": args.chat_output}
    scales, len_scales = _per_workload(args.workload_scale), _per_workload(args.workload_len_scale)
    workloads = [make_workload(n, vocab, seed=args.seed, scale=scales.get(n, args.scale),
                               len_scale=len_scales.get(n, args.len_scale),
                               **(kw if n == "chat" else {}))
                 for n in names]
    shape = floor_mod.ModelShape.from_hf_config(cfg, dtype_bytes=torch.finfo(dtype).bits // 8)
    hw = floor_mod.measure_hardware(args.device, dtype, copy_mib=args.hw_copy_mib,
                                    matmul_n=args.hw_matmul_n)
    print(f"hardware: {hw.name}: matmul {hw.matmul_flops / 1e12:.2f} TFLOP/s, copy "
          f"{hw.copy_bandwidth / 1e9:.1f} GB/s", flush=True)
    header = {"command": " ".join(sys.argv), "model": args.model, "device": hw.name,
              "dtype": str(dtype), "matmul TFLOP/s": round(hw.matmul_flops / 1e12, 3),
              "copy GB/s": round(hw.copy_bandwidth / 1e9, 1), "page_size": args.page_size}
    runs: list[dict[str, Any]] = []
    floors: dict[str, dict[str, Any]] = {}

    def save(r: dict[str, Any]) -> None:
        runs.append(r)
        (out_dir / f"{r['workload']}_{r['variant']}.json").write_text(json.dumps(r, indent=1))
        m = r["metrics"]
        print(f"[{r['workload']}/{r['variant']}] {m['duration_s']:.2f}s, out {m['output_throughput']:.0f}"
              f" tok/s, TTFT {m['ttft_s']['mean'] * 1e3:.1f} ms, hit {m['hit_rate']:.3f} "
              f"(optimal {r['optimal_hit_rate']:.3f})", flush=True)

    def time_left() -> bool:
        return args.deadline_s is None or time.perf_counter() - started < args.deadline_s

    skipped: list[str] = []
    variants = (["radix", "nocache"] if args.compare_cache
                else ["nocache"] if args.no_cache else ["radix"])
    variants += ["hf"] if args.baseline == "hf" else []
    if args.variants:
        variants = args.variants.split(",")
        assert set(variants) <= {"radix", "nocache", "hf"}, f"bad --variants {args.variants}"
    try:
        if args.mode == "online":
            from bench.online import run_online

            floors = build_floors(workloads, shape, hw, args, args.kv_cache_tokens)
            for w in workloads:
                out = run_online(w, url=args.url, endpoint=args.endpoint,
                                 request_rate=args.request_rate,
                                 max_concurrency=args.max_concurrency, api_key=args.api_key,
                                 max_context=None, progress=not args.no_progress, seed=args.seed)
                save(result(w, args.online_variant, out, args, floors.get(w.name)))
        else:
            for variant in (v for v in variants if v != "hf"):
                if not time_left():
                    skipped += [f"{w.name}/{variant}" for w in workloads]
                    continue
                _run_engine_variant(variant, workloads, args, shape, hw, floors, save, time_left,
                                    skipped)
                _free_device()
        if "hf" in variants and args.mode == "offline":
            if not floors:
                floors.update(build_floors(workloads, shape, hw, args, args.kv_cache_tokens))
            _run_hf(workloads, args, cfg, dtype, floors, save, time_left, skipped)
    except KeyboardInterrupt:
        print("interrupted: writing the report of the runs that finished", flush=True)
        skipped.append("(interrupted)")
    if skipped:
        header["skipped (deadline)"] = ", ".join(skipped)
    header["wall s"] = round(time.perf_counter() - started, 1)
    stem = f"summary-{args.tag}" if args.tag else "summary"
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"header": header, "floors": floors, "runs": runs}, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(runs, floors, header))
    if runs and not args.tag:
        plots(runs, out_dir)
    print((out_dir / f"{stem}.md").read_text())
    return 0


def _per_workload(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in WORKLOADS or not value:
            raise SystemExit(f"expected NAME=SCALE with NAME in {WORKLOADS}, got {item!r}")
        out[name] = float(value)
    return out


def _report_only(out_dir: Path) -> int:
    """Merge the run JSONs of several invocations (e.g. one process per variant) into one report."""
    runs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*_*.json"))]
    runs = [r for r in runs if isinstance(r, dict) and "variant" in r]
    floors = {r["workload"]: r["floor"] for r in runs if r.get("floor")}
    header: dict[str, Any] = {}
    for part in sorted(out_dir.glob("summary-*.json")):
        header.update(json.loads(part.read_text()).get("header", {}))
    (out_dir / "summary.md").write_text(markdown(runs, floors, header))
    (out_dir / "summary.json").write_text(json.dumps(
        {"header": header, "floors": floors, "runs": runs}, indent=1))
    if runs:
        plots(runs, out_dir)
    print((out_dir / "summary.md").read_text())
    return 0


def _run_engine_variant(variant: str, workloads: list[Workload], args: argparse.Namespace,
                        shape: floor_mod.ModelShape, hw: floor_mod.Hardware,
                        floors: dict[str, dict[str, Any]], save: Any, time_left: Any,
                        skipped: list[str]) -> None:
    from bench.offline import build_core, run_offline, warmup
    from bench.run_profiles import cprofile_run, profile_run
    from radixrt.kernels.compile_log import CompileLog

    core = build_core(args.model, device=args.device, dtype=args.dtype,
                      load_format=args.load_format, page_size=args.page_size,
                      kv_cache_tokens=args.kv_cache_tokens,
                      enable_prefix_cache=variant == "radix",
                      schedule_policy=args.schedule_policy,
                      max_running_requests=args.max_running_requests,
                      mem_fraction=args.mem_fraction, seed=args.seed,
                      host_kv_cache_tokens=args.host_kv_cache_tokens if variant == "radix" else 0,
                      max_prefill_tokens=args.max_prefill_tokens,
                      engine_warmup=False if args.no_warmup else None,
                      piecewise_max_tokens=args.piecewise_max_tokens,
                      prefill_attention=args.prefill_attention)
    if not floors:
        kv_tokens = core.stats().total_pages * args.page_size
        floors.update(build_floors(workloads, shape, hw, args, kv_tokens))
    if core.warmup_report is not None:
        print(f"engine warm-up: {json.dumps(core.warmup_report)}")
    if core.runner.graphs is not None:
        dg = core.runner.graphs
        print(f"decode graphs: {len(dg.graphs)} ({len(dg.sizes)} sizes, "
              f"{len(dg.bounds)} launch shapes), captured in {dg.capture_s:.1f}s")
    if core.runner.piecewise is not None:
        pw = core.runner.piecewise
        print(f"piecewise graphs: {len(pw.sizes)} sizes <= {pw.max_tokens} tokens, "
              f"captured in {pw.capture_s:.1f}s")
    if not args.no_warmup:
        warmup(core, shape.vocab_size)
    for w in workloads:
        if not time_left():
            skipped.append(f"{w.name}/{variant}")
            continue
        piecewise = core.runner.piecewise
        replayed = piecewise.replayed_steps if piecewise is not None else 0
        with CompileLog() as compiles:  # a compile inside the timed run stalls every request
            out = run_offline(core, w, progress=not args.no_progress, desc=f"{w.name} {variant}")
        r = result(w, variant, out, args, floors.get(w.name))
        r["kernel_compiles"] = compiles.summary()
        # Prefill / mixed steps that replayed piecewise CUDA graphs (None: graphs off).
        r["piecewise_steps"] = piecewise.replayed_steps - replayed if piecewise is not None else None
        if compiles.events:
            print(f"[{w.name}/{variant}] {len(compiles.events)} kernel compiles in the timed run "
                  f"({r['kernel_compiles']['seconds']:.2f}s): {list(r['kernel_compiles']['kernels'])}")
        save(r)
        core.flush_cache()  # the next workload starts cold, as its floor assumes
        if args.profile and args.device.startswith("cuda"):
            try:
                profile_run(core, w, variant, Path(args.out))
            except Exception as exc:  # noqa: BLE001 - the profile is extra: keep the suite going
                print(f"[{w.name}/{variant}] profile failed: {exc!r}", flush=True)
                core.flush_cache()
        if args.cprofile:
            cprofile_run(core, w, variant, Path(args.out))
    del core


def _run_hf(workloads: list[Workload], args: argparse.Namespace, cfg: dict[str, Any],
            dtype: torch.dtype, floors: dict[str, dict[str, Any]], save: Any, time_left: Any,
            skipped: list[str]) -> None:
    from bench.hf_baseline import load_hf_model, run_hf

    if not time_left():
        skipped += [f"{w.name}/hf" for w in workloads]
        return
    model = load_hf_model(args.model, cfg, device=args.device, dtype=dtype, seed=args.seed)
    max_ctx = int(cfg.get("max_position_embeddings", 1 << 30))
    for w in workloads:
        if not time_left():
            skipped.append(f"{w.name}/hf")
            continue
        out = run_hf(model, w, batch_size=args.hf_batch_size, max_context=max_ctx,
                     progress=not args.no_progress, max_requests=args.hf_max_requests)
        save(result(w, "hf", out, args, floors.get(w.name)))
    del model
    _free_device()


if __name__ == "__main__":
    sys.exit(main())
