"""Cascade decode kernel: where the time goes, and a launch-settings sweep, timed the way the
engine runs it (CUDA-graph replay, so no Python launch overhead in the numbers).

    python bench/cascade_sweep.py plan                 CPU: grids, items, bytes per launch for the
                                                       bench shapes (no GPU needed)
    python bench/cascade_sweep.py sweep [--out DIR]    CUDA: per-request vs cascade at 16x16 and
                                                       64x4, each pass alone, a coordinate-descent
                                                       sweep over the launch settings, a profiler
                                                       breakdown of the best; sweep.json

A graph holds ``REPS`` calls; call i reads KV layer i % LAYERS, so consecutive calls do not find
each other's KV in L2 (as a model's layers do not).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_cascade import HD, HKV, HQ, shared_batch  # noqa: E402
from radixrt.attention.cascade_plan import CascadeBuffers, ItemBudget, pack_cascade  # noqa: E402
from radixrt.kernels.cascade_decode import (  # noqa: E402
    CascadeLaunch,
    cascade_decode,
    cascade_merge,
    shared_prefix_pass,
)
from radixrt.kernels.cascade_meta import PrefixTiling  # noqa: E402
from radixrt.kernels.decode_attention import decode_attention, decode_partials  # noqa: E402
from radixrt.kernels.decode_plan import choose_num_splits  # noqa: E402

SHAPES = [(16, 16), (64, 4)]  # (groups, per group): batch 256, 2048 shared + 128..384 own
REPS, LAYERS, NUM_SMS = 20, 4, 132
KV_TOKEN_BYTES = HKV * HD * 2 * 2  # K and V, bf16


@dataclasses.dataclass(frozen=True)
class Variant:
    small_tiles: bool = True
    item_target: int = 33
    side: bool = True
    splits: int = 0  # suffix splits (0: the per-request decode's count for the batch)
    min_split_len: int = 256
    launch: CascadeLaunch = CascadeLaunch()

    def label(self) -> str:
        la = self.launch
        return (f"small={int(self.small_tiles)} items={self.item_target} side={int(self.side)} "
                f"splits={self.splits or 'auto'}/{self.min_split_len} "
                f"pre=({la.prefix_block_n},{la.prefix_warps},{la.prefix_stages}) "
                f"suf=({la.suffix_block_n},{la.suffix_warps},{la.suffix_stages})")


RUN2 = Variant(small_tiles=False, item_target=33, side=True,
               launch=CascadeLaunch(64, 4, 3, 64, 4, 3))


def plan(args: argparse.Namespace) -> None:
    """What each launch of the default configuration does at the bench shapes (host only)."""
    for g, per in SHAPES:
        batch, _ = shared_batch(g, per, 2048, (128, 384), 16, "cpu")
        groups = batch.cascade
        assert groups is not None
        splits = choose_num_splits(256, HKV, NUM_SMS, 32)
        for small in (False, True):
            tiling = PrefixTiling.make(HQ // HKV, torch.device("cuda"), small_tiles=small)
            target = args.item_target
            budget = ItemBudget(target, max(target, 512), 256, 64)
            buf = pack_cascade(groups, 256, tiling, budget, 256)
            n, n_small = int(buf[0]), int(buf[1])
            items = buf[2 : 2 + 5 * n].reshape(n, 5)
            lens = items[:, 2] - items[:, 1]
            rows = [tiling.small_m if j < n_small else tiling.block_m for j in range(n)]
            valid = items[:, 4] * (HQ // HKV)
            mma_rows = sum(r * ln for r, ln in zip(rows, lens.tolist()))
            suffix = sum(batch.prefix_lens_cpu) + 256 - 2048 * len(groups.members)
            print(f"{g}x{per} small_tiles={small}: tiles block_m {tiling.block_m} "
                  f"({tiling.tile_reqs} req) small_m {tiling.small_m} ({tiling.small_reqs} req)")
            print(f"  pass 1: grid ({target}, {HKV}) = {target * HKV} programs, {n} items/head "
                  f"({n_small} small), item len {lens.min()}..{lens.max()}, items/program "
                  f"{n / target:.2f}, shared KV {int(lens.sum()) * KV_TOKEN_BYTES / 1e6:.0f} MB, "
                  f"row use {valid @ lens / mma_rows:.2f} of MMA rows, partials "
                  f"{n * HKV * int(valid.mean()) * HD * 4 / 1e6:.1f} MB")
            print(f"  pass 2: grid (256, {HKV}, {splits}) = {256 * HKV * splits} programs, own KV "
                  f"{suffix * KV_TOKEN_BYTES / 1e6:.0f} MB; merge grid (256, {HKV}); "
                  f"launches 3 (+ fork/join on the side stream)")


def graph_ms(fn: Callable[[int], object]) -> float:
    """Median ms per call over replays of a graph of REPS calls (fn(i): call i)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(REPS):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / REPS)
    del graph
    return sorted(times)[len(times) // 2]


class Case:
    """One shape's batch, KV layers, buffers (small tiles on and off)."""

    def __init__(self, groups: int, per_group: int) -> None:
        torch.manual_seed(0)
        self.batch, slots = shared_batch(groups, per_group, 2048, (128, 384), 16, "cuda")
        self.k = [torch.randn(slots, HKV, HD, device="cuda", dtype=torch.bfloat16)
                  for _ in range(LAYERS)]
        self.v = [torch.randn_like(k) for k in self.k]
        self.q = torch.randn(256, HQ, HD, device="cuda", dtype=torch.bfloat16)
        self.splits = choose_num_splits(256, HKV, NUM_SMS, 32)
        rows = 256 * HQ * max(self.splits, 4)
        self.part_out = torch.empty(rows * HD, device="cuda")
        self.part_lse = torch.empty(rows, device="cuda")
        self.out = torch.empty_like(self.q)
        self.side = torch.cuda.Stream()
        self.buffers = {}
        for small in (False, True):
            tiling = PrefixTiling.make(HQ // HKV, torch.device("cuda"), small_tiles=small)
            budget = ItemBudget(33, 512, 256, 64)
            self.buffers[small] = CascadeBuffers(tiling, budget, max_batch=256, num_kv_heads=HKV,
                                                 head_dim=HD, device=torch.device("cuda"))

    def meta(self, var: Variant) -> Any:
        buffers = self.buffers[var.small_tiles]
        budget = dataclasses.replace(buffers.budget, item_target=var.item_target)
        assert self.batch.cascade is not None
        return buffers, buffers.upload(self.batch.cascade, 256, budget)

    def per_request(self, i: int) -> torch.Tensor:
        b = self.batch
        return decode_attention(self.q, self.k[i % LAYERS], self.v[i % LAYERS], b.seq_lens,
                                b.page_table, b.req_rows, 16, HD**-0.5, self.splits,
                                self.part_out, self.part_lse, out=self.out)

    def cascade_fn(self, var: Variant) -> Callable[[int], torch.Tensor]:
        buffers, meta = self.meta(var)
        b = self.batch

        def run(i: int) -> torch.Tensor:
            return cascade_decode(
                self.q, self.k[i % LAYERS], self.v[i % LAYERS], b.seq_lens, b.page_table,
                b.req_rows, 16, HD**-0.5, meta, buffers.tiling,
                num_splits=var.splits or self.splits, prefix_programs=var.item_target,
                suf_out=self.part_out, suf_lse=self.part_lse, pre_out=buffers.pre_out,
                pre_lse=buffers.pre_lse, out=self.out, min_split_len=var.min_split_len,
                launch=var.launch, side_stream=self.side if var.side else None)
        return run

    def parts(self, var: Variant) -> dict[str, float]:
        """Each kernel alone on the whole GPU (graph-timed)."""
        buffers, meta = self.meta(var)
        b, la = self.batch, var.launch
        bn = [64, var.min_split_len]
        splits = var.splits or self.splits

        def prefix(i: int) -> None:
            shared_prefix_pass(self.q, self.k[i % LAYERS], self.v[i % LAYERS], b.page_table, 16,
                               HD**-0.5, meta, buffers.tiling, prefix_programs=var.item_target,
                               pre_out=buffers.pre_out, pre_lse=buffers.pre_lse, launch=la)

        def suffix(i: int) -> None:
            bn[:] = decode_partials(
                self.q, self.k[i % LAYERS], self.v[i % LAYERS], b.seq_lens, b.page_table,
                b.req_rows, 16, HD**-0.5, splits, self.part_out, self.part_lse,
                min_split_len=var.min_split_len, kv_starts=meta.kv_starts, block_n=la.suffix_block_n,
                num_warps=la.suffix_warps, num_stages=la.suffix_stages)

        t_prefix, t_suffix = graph_ms(prefix), graph_ms(suffix)

        def merge(i: int) -> None:
            cascade_merge(self.part_out, self.part_lse, buffers.pre_out, buffers.pre_lse,
                          self.out, b.seq_lens, meta, buffers.tiling, num_kv_heads=HKV,
                          num_splits=splits, suffix_block_n=bn[0], min_split_len=bn[1])

        return {"prefix_alone_ms": t_prefix, "suffix_alone_ms": t_suffix,
                "merge_alone_ms": graph_ms(merge)}

    def profile(self, var: Variant) -> dict[str, float]:
        """Eager calls under the profiler: device time per call of each kernel."""
        from torch.profiler import ProfilerActivity, profile

        fn = self.cascade_fn(var)
        fn(0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(20):
                fn(i)
            torch.cuda.synchronize()
        res = {}
        for e in prof.key_averages():
            total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if e.count and total:
                res[e.key[:60]] = total / e.count / 1e3  # ms per launch
        return res


def sweep(args: argparse.Namespace) -> None:
    out_dir = Path(args.out or os.environ.get("OUT") or "bench/results/cascade")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "reps": REPS,
                               "layers": LAYERS}
    knobs: list[tuple[str, list[Any]]] = [
        ("item_target", [16, 33, 66, 132, 264]), ("prefix_block_n", [32, 64, 128]),
        ("prefix_warps", [4, 8]), ("prefix_stages", [2, 3, 4]), ("side", [True, False]),
        ("suffix_block_n", [32, 64, 128]), ("suffix_stages", [2, 3, 4]), ("suffix_warps", [4, 8]),
        ("splits", [1, 2, 4]), ("min_split_len", [128, 256]),
    ]
    for g, per in SHAPES:
        deadline = time.perf_counter() + args.sweep_s / len(SHAPES)
        case = Case(g, per)
        name = f"{g}x{per}"
        ref = case.per_request(0).clone()
        row: dict[str, Any] = {"per_request_ms": graph_ms(case.per_request)}
        print(f"{name}: per-request {row['per_request_ms']:.4f} ms", flush=True)

        def timed(var: Variant, row: dict[str, Any] = row, case: Case = case) -> float:
            try:
                t = graph_ms(case.cascade_fn(var))
            except Exception as e:  # a config Triton cannot build (shared memory): skip it
                print(f"  {var.label()}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                return float("inf")
            row.setdefault("rows", []).append({"variant": var.label(), "ms": t})
            print(f"  {var.label()}: {t:.4f} ms", flush=True)
            return t

        row["run2_ms"] = timed(RUN2)
        row["run2_no_side_ms"] = timed(dataclasses.replace(RUN2, side=False))
        best = Variant()  # the engine's defaults (cascade_decode's tiles, item target 33)
        best_t = row["defaults_ms"] = timed(best)
        for knob, values in knobs:
            for value in values:
                if time.perf_counter() > deadline:
                    break
                if knob in ("item_target", "side", "splits", "min_split_len"):
                    var = dataclasses.replace(best, **{knob: value})
                else:
                    var = dataclasses.replace(best, launch=dataclasses.replace(
                        best.launch, **{knob: value}))
                if var == best:
                    continue
                t = timed(var)
                if t < best_t:
                    best, best_t = var, t
        row["small_tiles_off_at_best_ms"] = timed(dataclasses.replace(best, small_tiles=False))
        out = case.cascade_fn(best)(0)
        row.update(best=best.label(), best_ms=best_t,
                   best_speedup=row["per_request_ms"] / best_t,
                   max_abs_diff_vs_per_request=float((out - ref).abs().max()))
        results[name] = row
        for key, method, var in (("parts_run2", case.parts, RUN2), ("parts_best", case.parts, best),
                                 ("profile_best", case.profile, best),
                                 ("profile_run2", case.profile, RUN2)):
            try:
                row[key] = method(var)
            except Exception as e:  # the profiler may lack CUPTI: keep the timings
                row[key] = f"{type(e).__name__}: {e}"
        print(json.dumps({k: v for k, v in row.items() if k != "rows"}, indent=1), flush=True)
        (out_dir / "sweep.json").write_text(json.dumps(results, indent=1))
        del case
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=("plan", "sweep"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--item-target", type=int, default=33, help="plan: pass-1 programs per head")
    ap.add_argument("--sweep-s", type=float, default=60.0, help="sweep budget over both shapes")
    args = ap.parse_args()
    plan(args) if args.mode == "plan" else sweep(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
