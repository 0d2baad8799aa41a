"""Decode attention at the random workload's shapes (small batch, short contexts): split count
and minimum split length against the KV read time (issue 18: random's attention was 1.56 ms a
step at 64 x 512 vs a 1.06 ms floor).

    python3 bench/decode_split_probe.py --out $OUT [--batches 16,64] [--ctxs 256,512]

For each (batch, context) the engine's split count (``choose_num_splits``) and its neighbours,
each with ``min_split_len`` 64 / 128 / 256 (the backend's default is 256), timed inside a CUDA
graph as the engine runs decode (``do_bench_cudagraph``, median; plain do_bench times the
Python launches at these sizes: ~60 us whatever the shape). Writes decode_split_probe.json;
prints GB/s as a share of the copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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

from radixrt.kernels.decode_attention import decode_attention  # noqa: E402
from radixrt.kernels.decode_plan import choose_num_splits  # noqa: E402


def probe(batch: int, ctx: int, copy_bw: float, sms: int,
          min_lens: tuple[int, ...] = (64, 128, 256)) -> list[dict[str, float]]:
    k_flat, v_flat, num_pages = paged_kv(batch * ctx, 16)
    table, rows_idx = random_page_table(batch, ctx, 16, num_pages)
    seq_lens = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
    q = torch.randn(batch, HQ, HD, device=DEV, dtype=BF16)
    out = torch.empty_like(q)
    chosen = choose_num_splits(batch, HKV, sms, 32)
    splits = sorted({1, 2, 4, 8, chosen, min(32, 2 * chosen)})
    part_out = torch.empty(batch * HQ * max(splits) * HD, device=DEV)
    part_lse = torch.empty(batch * HQ * max(splits), device=DEV)
    kv_bytes = 2 * batch * ctx * HKV * HD * 2
    rows = []
    for s in splits:
        for min_len in min_lens:
            ms = do_bench_cudagraph(lambda s=s, m=min_len: decode_attention(
                q, k_flat, v_flat, seq_lens, table, rows_idx, 16, HD**-0.5, s, part_out,
                part_lse, min_split_len=m, out=out), rep=100, return_mode="median")
            rows.append({"batch": batch, "ctx": ctx, "splits": s, "min_split_len": min_len,
                         "default": s == chosen and min_len == 256, "us": ms * 1e3,
                         "of_copy": kv_bytes / ms / 1e6 / copy_bw})
            print(f"B={batch:3d} ctx={ctx:4d} splits={s:2d} min_len={min_len:3d}: {ms * 1e3:6.1f} us"
                  f" {rows[-1]['of_copy']:.0%} of copy{' (default)' if rows[-1]['default'] else ''}",
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--ctxs", default="256,512")
    ap.add_argument("--min-lens", default="64,128,256")
    a = ap.parse_args()
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    copy_bw = copy_bandwidth_gbs()
    rows = [r for b in a.batches.split(",") for c in a.ctxs.split(",")
            for r in probe(int(b), int(c), copy_bw, sms,
                           tuple(int(m) for m in a.min_lens.split(",")))]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_split_probe.json").write_text(json.dumps({"copy_gbs": copy_bw, "rows": rows},
                                                            indent=1))


if __name__ == "__main__":
    main()
