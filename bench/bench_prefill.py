"""Prefill attention at flash-attention speed (issue 18, item 1): a tile sweep of the extend kernel
against the previous kernel and torch SDPA, then cold prefill of long prompts through the engine.

    python bench/bench_prefill.py sweep  --out DIR     # writes DIR/prefill_sweep.json
    python bench/bench_prefill.py engine --out DIR [--sweep-json DIR/prefill_sweep.json]

sweep: Llama-3-8B attention (32 query heads over 8 KV heads, head_dim 128, bf16, page 16, pages
randomly permuted) at 8 x 1024 new tokens, 8 x 1024 after a 1024-token prefix, and one 32k
prompt; every config is checked against an fp32 reference on sampled query rows first. Rates are
useful causal FLOPs over time, as % of a bf16 torch.matmul measured in the same run. Then split-KV
on one request of 512 new tokens after a 32k prefix. The best config overall (highest geometric
mean rate, correct everywhere) is printed as the line to commit into ``extend_configs.TABLE``.

engine: the llama3.1-8b preset (random weights) prefills one 32k and one 120k prompt cold, in
``--chunk``-token steps, with the sweep's best config installed; time to first token against
``floor.chunked_prefill_floor`` (compute-aware, and all FLOPs at the matmul rate).

``--device cpu --tiny`` runs both at toy sizes under TRITON_INTERPRET=1 (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radixrt.kernels import extend_dense, extend_newkv  # noqa: E402
from radixrt.kernels.extend_attention import extend_attention, extend_flops  # noqa: E402
from radixrt.kernels.extend_baseline import extend_attention_baseline  # noqa: E402
from radixrt.kernels.extend_configs import ExtendConfig  # noqa: E402

HQ, HKV, HD, PAGE = 32, 8, 128, 16
TOL = 2e-2  # bf16 relative error bound, as the kernel tests use
SHAPES = {"8x1024": (8, 1024, 0), "8x1024 +1k prefix": (8, 1024, 1024), "1x32k": (1, 32768, 0),
          # the engine's 4th 8192-token chunk of a cold 32k prompt, its prefix on one descending
          # run of pages (how the LIFO free list hands pages out after a flush)
          "1x8k +24k prefix (page runs)": (1, 8192, 24576)}
RUN_SHAPES = {"1x8k +24k prefix (page runs)", "2x24 +33 prefix (page runs)"}
SPLIT_SHAPE = ("1x512 +32k prefix", (1, 512, 32768))
TINY_SHAPES = {"2x40": (2, 40, 0), "2x24 +33 prefix": (2, 24, 33),
               "2x24 +33 prefix (page runs)": (2, 24, 33)}
TINY_SPLIT = ("1x8 +70 prefix", (1, 8, 70))
# (block_m, block_n, heads_per_tile, warps, stages), likeliest first (a spent time budget cuts the
# tail), each in some modes: "tma" / "ptr" read the new tokens' K/V from dense tensors
# (extend_newkv: TMA descriptors / pointer loads), "paged" reads every key through the page
# table (the session-4 kernel); "tma-fma" is "tma" with half of each unmasked tile's exp2 on the
# FMA pipe (ExtendConfig.exp_fma). Offline sm_90 builds (triton 3.9): shared memory is Q +
# stages x (K + V tile), so 128x64 at 3 stages (128 KB) runs one program per SM, 64x64 at 3
# stages (113 KB) two.
MODES = ("tma", "ptr", "paged")
# Session-5 call 2 (bench/recorded/h200_s5_call2) ranked these first at head_dim 128 (TMA mode:
# 69-70% at 1x32k, 42-43% at 8x1024, 50-52% with a 1k prefix); "tma-gather" turns the page-run
# TMA prefix off (pool_tma), to measure it on the page-runs shape.
_TILES: list[tuple[tuple[int, ...], tuple[str, ...]]] = [
    ((64, 64, 4, 4, 3), ("tma", "tma-fma", "tma-gather", "paged")),
    ((128, 64, 4, 4, 2), ("tma", "tma-fma", "tma-gather")),
    ((128, 128, 4, 8, 3), ("tma", "tma-fma")), ((64, 64, 1, 4, 3), ("tma",)),
    ((64, 64, 2, 4, 3), ("tma",)), ((128, 64, 4, 8, 3), ("tma",)), ((64, 32, 4, 4, 3), ("tma",)),
    ((128, 32, 4, 4, 3), ("tma",)), ((64, 64, 4, 4, 2), ("tma",)),
]  # fmt: skip
# head_dim 64: call 2's best (128x64 4 warps 3 stages, TMA and pointer loads tied at 58% at 1x32k).
_TILES_64: list[tuple[tuple[int, ...], tuple[str, ...]]] = [
    ((128, 64, 4, 4, 3), ("tma", "tma-fma", "ptr")), ((64, 64, 4, 4, 3), ("tma", "paged")),
    ((128, 64, 4, 8, 4), ("tma",)), ((128, 64, 4, 4, 4), ("tma",)),
]  # fmt: skip


def candidates(tiles: list[tuple[tuple[int, ...], tuple[str, ...]]]) -> list[tuple[ExtendConfig, str]]:
    """(config, mode) pairs; the mode's TMA and exp2 choices live in the config."""
    return [(ExtendConfig(*t, True, mode != "ptr", mode != "tma-gather", mode.endswith("fma")),
             mode) for t, modes in tiles for mode in modes]


CANDIDATES, CANDIDATES_64 = candidates(_TILES), candidates(_TILES_64)
TINY_CANDIDATES = candidates([((16, 16, 4, 4, 1), MODES), ((32, 16, 1, 4, 1), ("tma-fma",))])


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def once(fn: Callable[[], object]) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return once


def matmul_tflops(device: torch.device, ms: Callable[[Callable[[], object]], float]) -> float:
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / ms(lambda: torch.matmul(a, b)) / 1e9


def softmax_scale(head_dim: int) -> float:
    return float(head_dim) ** -0.5


class Case:
    """Random paged K/V (fragmented pages, shuffled table rows) and queries for one shape, with
    an fp32 reference on sampled query rows of every request."""

    def __init__(self, batch: int, new: int, prefix: int, device: torch.device,
                 dtype: torch.dtype, heads: tuple[int, int, int], page_runs: bool = False) -> None:
        self.batch, self.new, self.prefix = batch, new, prefix
        hq, hkv, hd = heads
        seq = prefix + new
        per_req = triton.cdiv(seq, PAGE)
        num_pages = batch * per_req + 2
        shape = ((num_pages + 1) * PAGE, hkv, hd)
        self.k = torch.randn(shape, device=device, dtype=dtype)
        self.v = torch.randn(shape, device=device, dtype=dtype)
        perm = torch.randperm(num_pages, device=device)[: batch * per_req] + 1
        self.table = torch.zeros(batch + 1, per_req, dtype=torch.int32, device=device)
        self.table[1:] = perm.view(batch, per_req).to(torch.int32)
        if page_runs:  # each request on one descending run of consecutive pages
            runs = torch.arange(batch * per_req, device=device).view(batch, per_req) + 1
            self.table[1:] = runs.flip(1).to(torch.int32)
        self.rows = (torch.randperm(batch, device=device) + 1).to(torch.int32)
        self.indptr = torch.arange(0, (batch + 1) * new, new, device=device, dtype=torch.int32)
        self.prefix_lens = torch.full((batch,), prefix, device=device, dtype=torch.int32)
        self.q = torch.randn(batch * new, hq, hd, device=device, dtype=dtype)
        # The new tokens' K/V as the forward holds them (dense, one row per new token).
        pos = torch.arange(prefix, seq, device=device)
        slots = torch.cat([self.table[int(r)].long()[pos // PAGE] * PAGE + pos % PAGE
                           for r in self.rows.tolist()])
        self.k_new, self.v_new = self.k[slots].contiguous(), self.v[slots].contiguous()
        self.flops = extend_flops([new] * batch, [prefix] * batch, hq, hd)
        self.sel, self.ref = self._reference(hq // hkv)

    def _reference(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        sel_all, refs = [], []
        pos = torch.arange(self.prefix + self.new, device=self.q.device)
        for b in range(self.batch):
            j = torch.unique(torch.cat([torch.tensor([0, self.new - 1]),
                                        torch.randint(0, self.new, (30,), generator=gen)]))
            j = j.to(self.q.device)
            page_row = self.table[int(self.rows[b])].long()
            slots = page_row[pos // PAGE] * PAGE + pos % PAGE
            k = self.k[slots].float().repeat_interleave(group, dim=1)  # [L, Hq, D]
            v = self.v[slots].float().repeat_interleave(group, dim=1)
            qi = self.q[b * self.new + j].float()  # [R, Hq, D]
            scores = torch.einsum("rhd,lhd->hrl", qi, k) * softmax_scale(qi.shape[-1])
            scores = scores.masked_fill(pos[None, None, :] > (self.prefix + j)[None, :, None],
                                        float("-inf"))
            refs.append(torch.einsum("hrl,lhd->rhd", torch.softmax(scores, -1), v))
            sel_all.append(b * self.new + j)
        return torch.cat(sel_all), torch.cat(refs)

    def err(self, out: torch.Tensor) -> float:
        got = out[self.sel].double()
        return float((got - self.ref.double()).norm() / self.ref.double().norm())

    def run_new(self, out: torch.Tensor, cfg: ExtendConfig | None, splits: int | None,
                auto: bool = False, dense: bool = False, mode: str = "tma") -> torch.Tensor:
        dense_kv = mode != "paged"  # tma, tma-fma, ptr
        return extend_attention(
            self.q, self.k, self.v, self.indptr, self.prefix_lens, self.table, self.rows, PAGE,
            self.new, softmax_scale(self.q.shape[-1]), out=out, config=cfg, num_kv_splits=splits,
            max_seq_len=self.prefix + self.new if auto else None, dense_new=dense,
            k_new=self.k_new if dense_kv else None, v_new=self.v_new if dense_kv else None,
        )  # fmt: skip

    def run_old(self, out: torch.Tensor) -> torch.Tensor:
        return extend_attention_baseline(
            self.q, self.k, self.v, self.indptr, self.prefix_lens, self.table, self.rows, PAGE,
            self.new, softmax_scale(self.q.shape[-1]), out=out,
        )  # fmt: skip


def measure(case: Case, fn: Callable[[torch.Tensor], object], mm: float,
            ms: Callable[[Callable[[], object]], float]) -> dict[str, Any]:
    """Correctness first (into a NaN-filled output), then the median time."""
    out = torch.full_like(case.q, float("nan"))
    try:
        fn(out)
        err = case.err(out)
        t = ms(lambda: fn(out))
    except Exception as exc:  # noqa: BLE001 - a config may not compile (shared memory, ...)
        return {"error": repr(exc)[:300]}
    tflops = case.flops / t / 1e9
    return {"ms": t, "tflops": tflops, "pct_of_matmul": 100 * tflops / mm, "rel_err": err,
            "correct": bool(err < TOL)}


def sdpa(case: Case, mm: float, ms: Callable[[Callable[[], object]], float]) -> dict[str, Any]:
    """torch SDPA on dense (non-paged) tensors of the same shape: the reference point."""
    b, n, p = case.batch, case.new, case.prefix
    dev, dt = case.q.device, case.q.dtype
    hq, hkv, hd = case.q.shape[1], case.k.shape[1], case.q.shape[2]
    q = torch.randn(b, hq, n, hd, device=dev, dtype=dt)
    k = torch.randn(b, hkv, p + n, hd, device=dev, dtype=dt)
    v = torch.randn_like(k)
    f = torch.nn.functional.scaled_dot_product_attention
    try:
        if p == 0:
            t = ms(lambda: f(q, k, v, is_causal=True, enable_gqa=True))
        else:  # bottom-right causal mask (query j sees keys < p + j + 1); GQA expanded
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(n, p + n)
            ke, ve = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
            t = ms(lambda: f(q, ke, ve, attn_mask=mask))
    except Exception as exc:  # noqa: BLE001 - a torch build without that backend
        return {"error": repr(exc)[:300]}
    tflops = case.flops / t / 1e9
    return {"ms": t, "tflops": tflops, "pct_of_matmul": 100 * tflops / mm}


def best_overall(shapes: dict[str, Any]) -> dict[str, Any] | None:
    """The config correct at every shape with the highest geometric-mean rate."""
    scores: dict[tuple[Any, ...], list[float]] = {}
    for res in shapes.values():
        for row in res["configs"]:
            key = (*row["config"], row.get("mode", "paged"))
            ok = row.get("correct", False)
            scores.setdefault(key, []).append(row["pct_of_matmul"] if ok else 0.0)
    full = {k: v for k, v in scores.items() if len(v) == len(shapes) and min(v) > 0}
    if not full:
        return None
    key = max(full, key=lambda k: math.prod(full[k]) ** (1 / len(full[k])))
    return {"config": list(key[:-1]), "mode": key[-1],
            "geomean_pct": math.prod(full[key]) ** (1 / len(full[key])),
            "pct_by_shape": dict(zip(shapes, full[key]))}


def sweep_heads(result: dict[str, Any], heads: tuple[int, int, int], shapes: dict[str, Any],
                cands: list[tuple[ExtendConfig, str]], mm: float, args: argparse.Namespace,
                deadline: float) -> dict[str, Any]:
    """Old kernel, SDPA, the default and every candidate at each shape of one head layout."""
    dev, ms = torch.device(args.device), timer(torch.device(args.device))
    out: dict[str, Any] = {"heads": list(heads), "shapes": {}}
    cases = {name: Case(b, n, p, dev, torch.bfloat16, heads, name in RUN_SHAPES)
             for name, (b, n, p) in shapes.items()}
    for name, case in cases.items():
        res: dict[str, Any] = {"batch": case.batch, "new": case.new, "prefix": case.prefix,
                               "flops": case.flops, "configs": []}
        res["old"] = measure(case, case.run_old, mm, ms)
        res["sdpa"] = sdpa(case, mm, ms) if not args.tiny else {}
        res["new_default"] = measure(case, lambda o, c=case: c.run_new(o, None, None, True), mm, ms)  # type: ignore[misc]
        res["paged_default"] = measure(
            case, lambda o, c=case: c.run_new(o, None, None, True, mode="paged"), mm, ms)  # type: ignore[misc]
        out["shapes"][name] = res
        print(f"{name} {heads}: old {fmt(res['old'])} | sdpa {fmt(res['sdpa'])} | default "
              f"{fmt(res['new_default'])} | paged default {fmt(res['paged_default'])}", flush=True)
    # Config-major, so a spent budget drops whole configs, never one config's later shapes.
    for cfg, mode in cands:
        if time.perf_counter() > deadline:
            print(f"sweep budget spent: {heads} skips the rest", flush=True)
            break
        for name, case in cases.items():
            row = measure(case, lambda o, c=cfg, k=case, m=mode: k.run_new(o, c, 1, mode=m), mm, ms)  # type: ignore[misc]
            out["shapes"][name]["configs"].append(
                {"config": list(cfg.as_tuple()), "mode": mode, **row})
            print(f"  {name} {mode} {cfg.as_tuple()}: {fmt(row)}", flush=True)
        write(args.out, "prefill_sweep.json", result)
    for name, res in out["shapes"].items():
        ok = [r for r in res["configs"] if r.get("correct")]
        res["best"] = max(ok, key=lambda r: r["tflops"]) if ok else None
        print(f"{name} {heads}: best {res['best'] and res['best']['config']} "
              f"{res['best'] and res['best']['mode']} {fmt(res['best'] or {})}", flush=True)
        if res["best"] and not args.tiny and not args.no_hybrid:  # new x new on SDPA
            cfg = ExtendConfig(*res["best"]["config"])
            case = cases[name]
            res["hybrid"] = measure(
                case, lambda o, c=cfg, k=case: k.run_new(o, c, 1, dense=True), mm, ms,  # type: ignore[misc]
            )  # fmt: skip
            res["hybrid"]["sdpa_ops"] = dict(extend_dense._WORKS)
            print(f"{name} {heads}: hybrid (SDPA new x new + paged prefix) "
                  f"{fmt(res['hybrid'])} {res['hybrid']['sdpa_ops']}", flush=True)
    del cases
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    best = out["best_overall"] = best_overall(out["shapes"])
    if best is not None and dev.type == "cuda":
        key = (max(16, triton.next_power_of_2(heads[2])), heads[0] // heads[1],
               result["capability"][0])
        out["table_line"] = f"{key}: ExtendConfig{tuple(best['config'])},"
        print("commit into extend_configs.TABLE:", out["table_line"], "mode", best["mode"],
              flush=True)
    return out


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device(args.device)
    ms = timer(dev)
    heads = (HQ, HKV, HD) if not args.tiny else (8, 2, 32)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                              else "cpu (interpreter)", "torch": torch.__version__,
                              "triton": triton.__version__}  # fmt: skip
    if dev.type == "cuda":
        result["capability"] = list(torch.cuda.get_device_capability(dev))
    mm = matmul_tflops(dev, ms)
    result["matmul_tflops"] = mm
    print(f"{result['device']}: bf16 matmul {mm:.0f} TFLOP/s", flush=True)
    started = time.perf_counter()
    shapes, cands = (TINY_SHAPES, TINY_CANDIDATES) if args.tiny else (SHAPES, CANDIDATES)
    main = sweep_heads(result, heads, shapes, cands, mm, args, started + args.budget_s)
    result.update(main)  # the head_dim 128 results stay at the top level
    write(args.out, "prefill_winner.json", winners(result))  # kept should a later part time out
    best = main["best_overall"]
    split_cfg = ExtendConfig(*best["config"]) if best else None
    mode = best["mode"] if best else "tma"
    sname, (b, n, p) = TINY_SPLIT if args.tiny else SPLIT_SHAPE
    case = Case(b, n, p, dev, torch.bfloat16, heads)
    split_rows = [{"splits": "old", **measure(case, case.run_old, mm, ms)},
                  {"splits": "auto", **measure(case, lambda o, k=case: k.run_new(o, split_cfg, None, True, mode=mode), mm, ms)}]  # type: ignore[misc]
    for s in (1, 2, 4):
        split_rows.append({"splits": s, **measure(case, lambda o, s=s, k=case: k.run_new(o, split_cfg, s, mode=mode), mm, ms)})  # type: ignore[misc]
    result["split"] = {"shape": sname, "config": best and best["config"], "mode": mode,
                       "rows": split_rows}
    for r in split_rows:
        print(f"{sname} splits={r['splits']}: {fmt(r)}", flush=True)
    del case
    if not args.tiny and args.budget_64_s > 0:  # head_dim 64 (GQA 4): fewer configs, two shapes
        result["head_dim_64"] = sweep_heads(
            result, (HQ, HKV, 64), {k: SHAPES[k] for k in ("8x1024", "1x32k")}, CANDIDATES_64,
            mm, args, started + args.budget_s + args.budget_64_s,
        )  # fmt: skip
    result["tma_failed"] = extend_newkv._TMA_FAILED  # set: "tma" rows ran pointer loads
    write(args.out, "prefill_winner.json", winners(result))
    result["sweep_s"] = time.perf_counter() - started
    write(args.out, "prefill_sweep.json", result)
    return result


def winners(result: dict[str, Any]) -> dict[str, Any]:
    """What to commit: per head_dim, the best (config, mode) overall with its TABLE line and
    whether the dense new-token path (USE_NEW_KV) won, plus the per-shape bests."""
    out: dict[str, Any] = {"tma_failed": result.get("tma_failed")}
    for tag, part in (("head_dim_128", result), ("head_dim_64", result.get("head_dim_64"))):
        if not part or not part.get("best_overall"):
            continue
        best = part["best_overall"]
        out[tag] = {"table_line": part.get("table_line"), "config": best["config"],
                    "mode": best["mode"], "use_new_kv": best["mode"] != "paged",
                    "geomean_pct": best["geomean_pct"], "pct_by_shape": best["pct_by_shape"],
                    "best_by_shape": {name: res["best"] and {k: res["best"][k] for k in (
                        "config", "mode", "pct_of_matmul")} for name, res in part["shapes"].items()},
                    "sdpa_by_shape": {name: res["sdpa"].get("pct_of_matmul")
                                      for name, res in part["shapes"].items()}}
    return out


def fmt(r: dict[str, Any]) -> str:
    if not r:
        return "-"
    if "error" in r:
        return "ERROR " + r["error"][:120]
    ok = "" if r.get("correct", True) else f" WRONG (err {r['rel_err']:.2e})"
    return f"{r['ms'] * 1e3:.0f} us {r['tflops']:.0f} TFLOP/s {r['pct_of_matmul']:.0f}%{ok}"


def write(out: str, name: str, obj: dict[str, Any]) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / name).write_text(json.dumps(obj, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["sweep", "engine"])
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU interpreter smoke test)")
    ap.add_argument("--budget-s", type=float, default=200.0, help="sweep: stop trying configs")
    ap.add_argument("--budget-64-s", type=float, default=40.0,
                    help="sweep: head_dim 64 part (0: skipped)")
    ap.add_argument("--no-hybrid", action="store_true", help="sweep: skip the SDPA hybrid rows")
    ap.add_argument("--sweep-json", default=None, help="engine: install this sweep's best config")
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--chunk", type=int, default=8192, help="engine: prefill tokens per step")
    ap.add_argument("--lens", default="32768,120000", help="engine: cold prompt lengths")
    ap.add_argument("--old-lens", default="32768", help="engine: the same with the old kernel")
    ap.add_argument("--paged-lens", default="32768",
                    help="engine: the same tiles with every key through the page table")
    ap.add_argument("--dense-new-min", type=int, default=1024,
                    help="engine: hybrid runs use SDPA for extends of at least this many tokens")
    ap.add_argument("--dense-extend-min", type=int, default=0,
                    help="engine: also run every chunk of at least this many tokens whole on SDPA "
                         "(extend_dense.dense_extend; 0: not run)")
    args = ap.parse_args()
    if args.mode == "sweep":
        run_sweep(args)
    else:
        from bench.prefill_engine import run_engine

        run_engine(args)


if __name__ == "__main__":
    main()
