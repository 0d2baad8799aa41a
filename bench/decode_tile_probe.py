"""Decode attention's launch settings at the random workload's and the 256 x 1k shapes: KV tile
(BLOCK_N), warps and pipeline stages, and the one-split path that writes the output from stage 1
(no merge launch) against the two-launch path (issue 18: random's attention was ~1.5x its KV read
time; at small contexts a tile's shared memory sets how many programs fit an SM at once, and so
how many waves a step takes).

    python3 bench/decode_tile_probe.py --out $OUT [--shapes 16x512,256x1024] [--settings 32/2/3]

Each row is timed inside a CUDA graph (``do_bench_cudagraph``, median), as the engine replays
decode. Writes decode_tile_probe.json and prints each shape's best settings against the
engine's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import (  # noqa: E402
    BF16,
    DEV,
    HD,
    HKV,
    HQ,
    copy_bandwidth_gbs,
    paged_kv,
    random_page_table,
)

from radixrt.kernels.decode_attention import decode_attention, decode_partials  # noqa: E402
from radixrt.kernels.decode_plan import choose_short_splits, decode_launch  # noqa: E402

DEFAULT_SHAPES = "8x512,16x256,16x1024,32x512,64x256,64x512,64x1024,128x512,256x1024"
SETTINGS = [(bn, w, s) for bn in (16, 32, 64, 128) for w in (2, 4, 8) for s in (2, 3, 4)
            if not (bn == 128 and s == 4) and not (bn == 16 and w == 8)]


def probe(batch: int, ctx: int, copy_gbs: float, sms: int,
          settings: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    k_flat, v_flat, num_pages = paged_kv(batch * ctx, 16)
    table, rows_idx = random_page_table(batch, ctx, 16, num_pages)
    seq_lens = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
    q = torch.randn(batch, HQ, HD, device=DEV, dtype=BF16)
    out = torch.empty_like(q)
    splits = choose_short_splits(batch, HKV, sms, 32, 256)
    part_out = torch.empty(batch * HQ * 2 * max(splits, 2) * HD, device=DEV)
    part_lse = torch.empty(batch * HQ * 2 * max(splits, 2), device=DEV)
    kv_bytes = 2 * batch * ctx * HKV * HD * 2
    ref = decode_attention(q, k_flat, v_flat, seq_lens, table, rows_idx, 16, HD**-0.5, splits,
                           part_out, part_lse, direct_single_split=False).float()
    rows: list[dict[str, Any]] = []

    def timed(tag: str, fn: Any, **info: Any) -> None:
        try:
            fn()
            err = (out.float() - ref).abs().max().item()
            ms = do_bench_cudagraph(fn, rep=60, return_mode="median")
        except Exception as exc:  # noqa: BLE001 - an out-of-resources config is a data point
            print(f"B={batch} ctx={ctx} {tag}: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
            return
        rows.append({"batch": batch, "ctx": ctx, "variant": tag, "us": ms * 1e3, "max_err": err,
                     "of_copy": kv_bytes / ms / 1e6 / copy_gbs, **info})

    def engine_two_stage() -> None:
        decode_attention(q, k_flat, v_flat, seq_lens, table, rows_idx, 16, HD**-0.5, splits,
                         part_out, part_lse, out=out, direct_single_split=False)

    launch = decode_launch(batch, HKV, sms, splits, DEV)

    def engine_now() -> None:
        decode_attention(q, k_flat, v_flat, seq_lens, table, rows_idx, 16, HD**-0.5, splits,
                         part_out, part_lse, out=out, launch=launch)

    timed("engine:two-stage", engine_two_stage, splits=splits)
    timed("engine:now", engine_now, splits=splits, launch=str(launch))
    for bn, w, s in settings:
        def run(bn: int = bn, w: int = w, s: int = s) -> None:
            decode_partials(q, k_flat, v_flat, seq_lens, table, rows_idx, 16, HD**-0.5, 1,
                            part_out, part_lse, block_n=bn, num_warps=w, num_stages=s,
                            direct_out=out)
        timed(f"direct:{bn}/{w}w/{s}s", run, splits=1, block_n=bn, warps=w, stages=s)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--tag", default="", help="suffix of the results file's name")
    ap.add_argument("--settings", default="", help="BLOCK_N/warps/stages,... (default: a sweep)")
    a = ap.parse_args()
    settings = ([tuple(int(x) for x in t.split("/")) for t in a.settings.split(",")]
                if a.settings else SETTINGS)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    copy_gbs = copy_bandwidth_gbs()
    rows: list[dict[str, Any]] = []
    for shape in a.shapes.split(","):
        b, c = (int(x) for x in shape.split("x"))
        got = probe(b, c, copy_gbs, sms, settings)  # type: ignore[arg-type]
        rows += got
        engine = {r["variant"]: r for r in got if r["variant"].startswith("engine")}
        best = sorted((r for r in got if r["variant"].startswith("direct:")),
                      key=lambda r: r["us"])[:3]
        summary = ", ".join(f"{r['variant']} {r['us']:.1f} us ({r['of_copy']:.0%})" for r in best)
        two = engine.get("engine:two-stage", {}).get("us", float("nan"))
        now = engine.get("engine:now", {}).get("us", float("nan"))
        print(f"B={b:3d} ctx={c:5d}: two-stage {two:.1f} us, engine now {now:.1f} us; "
              f"best {summary}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"decode_tile_probe{a.tag}.json").write_text(json.dumps({"copy_gbs": copy_gbs, "rows": rows},
                                                           indent=1))


if __name__ == "__main__":
    main()
