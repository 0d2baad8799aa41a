"""Time radixrt's Triton kernels on CUDA against the card's own measured ceilings.

Ceilings, measured here: device-to-device copy bandwidth (bytes read + written over time of a
1 GiB copy) and a bf16 8192^3 matmul rate. Every kernel is timed with triton.testing.do_bench
(median; it clears L2 between runs) on random data. Memory-bound kernels report GB/s of the
fewest bytes they must move and the fraction of copy bandwidth; extend attention reports
TFLOP/s of its useful (causal) FLOPs and the fraction of the matmul rate.

    python bench/bench_kernels.py [--out DIR]     (DIR defaults to $OUT, else bench/results)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radixrt.kernels.activation import silu_and_mul  # noqa: E402
from radixrt.kernels.decode_attention import decode_attention  # noqa: E402
from radixrt.kernels.decode_plan import choose_num_splits  # noqa: E402
from radixrt.kernels.extend_attention import extend_attention, extend_flops  # noqa: E402
from radixrt.kernels.extend_configs import ExtendConfig  # noqa: E402
from radixrt.kernels.rmsnorm import fused_add_rms_norm, rms_norm  # noqa: E402
from radixrt.kernels.rope import apply_rope  # noqa: E402
from radixrt.kernels.store_kv import store_kv  # noqa: E402

DEV = torch.device("cuda")
BF16 = torch.bfloat16
# Llama-3-8B attention shapes.
HQ, HKV, HD = 32, 8, 128


def median_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))


def copy_bandwidth_gbs() -> float:
    src = torch.randn(1 << 28, device=DEV)  # 1 GiB fp32
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def matmul_tflops() -> float:
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=BF16)
    b = torch.randn(n, n, device=DEV, dtype=BF16)
    ms = median_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def paged_kv(total_tokens: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Random K/V pool layer with 2 spare pages; returns (k_flat, v_flat, num_pages)."""
    num_pages = triton.cdiv(total_tokens, page_size) + 2
    shape = ((num_pages + 1) * page_size, HKV, HD)
    return (
        torch.randn(shape, device=DEV, dtype=BF16),
        torch.randn(shape, device=DEV, dtype=BF16),
        num_pages,
    )


def random_page_table(
    batch: int, seq_len: int, page_size: int, num_pages: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(page_table [batch + 1, pages per request] int32 with scratch row 0, req_rows [batch]
    int32 in shuffled order), like the engine's device page table."""
    per_req = triton.cdiv(seq_len, page_size)
    perm = torch.randperm(num_pages, device=DEV)[: batch * per_req] + 1  # fragmented pages
    table = torch.zeros(batch + 1, per_req, dtype=torch.int32, device=DEV)
    table[1:] = perm.view(batch, per_req)
    rows = (torch.randperm(batch, device=DEV) + 1).to(torch.int32)
    return table, rows


def bench_decode(batch: int, seq_len: int, page_size: int, splits: list[int]) -> list[dict]:
    k_flat, v_flat, num_pages = paged_kv(batch * seq_len, page_size)
    table, rows_idx = random_page_table(batch, seq_len, page_size, num_pages)
    seq_lens = torch.full((batch,), seq_len, device=DEV, dtype=torch.int32)
    q = torch.randn(batch, HQ, HD, device=DEV, dtype=BF16)
    out = torch.empty_like(q)
    max_s = max(splits)
    part_out = torch.empty(batch * HQ * max_s * HD, device=DEV)
    part_lse = torch.empty(batch * HQ * max_s, device=DEV)
    kv_bytes = 2 * batch * seq_len * HKV * HD * 2
    rows = []
    for s in splits:

        def run(s: int = s) -> torch.Tensor:
            return decode_attention(
                q, k_flat, v_flat, seq_lens, table, rows_idx, page_size, HD**-0.5, s, part_out,
                part_lse,
                out=out,
            )  # fmt: skip

        ms = median_ms(run)
        rows.append({"splits": s, "ms": ms, "gbs": kv_bytes / ms / 1e6})
    return rows


def bench_extend(batch: int, new: int, prefix: int, page_size: int) -> dict:
    seq = prefix + new
    k_flat, v_flat, num_pages = paged_kv(batch * seq, page_size)
    table, rows_idx = random_page_table(batch, seq, page_size, num_pages)
    qo_indptr = torch.arange(0, (batch + 1) * new, new, device=DEV, dtype=torch.int32)
    prefix_lens = torch.full((batch,), prefix, device=DEV, dtype=torch.int32)
    q = torch.randn(batch * new, HQ, HD, device=DEV, dtype=BF16)
    out = torch.empty_like(q)
    ms = median_ms(
        lambda: extend_attention(
            q, k_flat, v_flat, qo_indptr, prefix_lens, table, rows_idx, page_size, new, HD**-0.5,
            out=out,
        )
    )
    flops = extend_flops([new] * batch, [prefix] * batch, HQ, HD)
    return {"ms": ms, "tflops": flops / ms / 1e9}


def sweep_extend(batch: int, new: int, page_size: int) -> list[dict]:
    """Tile configs for extend attention, each checked against the torch reference first
    (bench/bench_prefill.py sweeps more, at more shapes)."""
    from radixrt.attention.torch_ref import paged_attention_reference
    from radixrt.engine.batch import build_forward_batch

    k_flat, v_flat, num_pages = paged_kv(batch * new, page_size)
    table, rows_idx = random_page_table(batch, new, page_size, num_pages)
    fb = build_forward_batch(
        new_token_ids=[[1] * new] * batch, prefix_lens=[0] * batch,
        page_tables=table[rows_idx.long()].tolist(),
        page_size=page_size, device=DEV,
    )  # fmt: skip
    q = torch.randn(batch * new, HQ, HD, device=DEV, dtype=BF16)
    ref = paged_attention_reference(q, k_flat, v_flat, fb, HD**-0.5).float()
    flops = extend_flops([new] * batch, [0] * batch, HQ, HD)
    rows = []
    for cfg in [ExtendConfig(*c) for c in [
            (128, 64, 4, 4, 3), (128, 128, 4, 8, 3), (64, 64, 4, 4, 4), (64, 64, 1, 4, 4),
            (128, 64, 1, 8, 3), (128, 128, 1, 8, 2)]]:  # fmt: skip
        try:
            out = torch.full_like(q, float("nan"))

            def run(cfg: ExtendConfig = cfg, out: torch.Tensor = out) -> torch.Tensor:
                return extend_attention(
                    q, k_flat, v_flat, fb.qo_indptr, fb.prefix_lens, fb.page_table, fb.req_rows, page_size,
                    new, HD**-0.5, out=out, config=cfg,
                )  # fmt: skip

            run()
            err = float((out.float() - ref).norm() / ref.norm())
            ms = median_ms(run)
            rows.append({"config": cfg.as_tuple(), "ms": ms, "tflops": flops / ms / 1e9, "rel_err": err})
        except Exception as exc:  # noqa: BLE001 - a config may exceed shared memory
            rows.append({"config": cfg.as_tuple(), "error": repr(exc)[:200]})
        print(rows[-1], flush=True)
    return rows


def bench_sdpa(batch: int, new: int) -> dict:
    """Torch's fused causal attention on dense (non-paged) tensors, as a reference point."""
    q = torch.randn(batch, HQ, new, HD, device=DEV, dtype=BF16)
    k = torch.randn(batch, HKV, new, HD, device=DEV, dtype=BF16)
    v = torch.randn_like(k)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ms = median_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True))
    flops = extend_flops([new] * batch, [0] * batch, HQ, HD)
    return {"ms": ms, "tflops": flops / ms / 1e9}


def bench_elementwise() -> list[dict]:
    tokens, hidden, inter = 8192, 4096, 14336
    x = torch.randn(tokens, hidden, device=DEV, dtype=BF16)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device=DEV, dtype=BF16)
    q = torch.randn(tokens, HQ, HD, device=DEV, dtype=BF16)
    k = torch.randn(tokens, HKV, HD, device=DEV, dtype=BF16)
    pos = torch.randint(0, 8192, (tokens,), device=DEV)
    cache = torch.randn(8192, HD, device=DEV)
    gate_up = torch.randn(tokens, 2 * inter, device=DEV, dtype=BF16)
    slots = torch.randperm(tokens * 4, device=DEV)[:tokens]
    k_pool = torch.empty(tokens * 4, HKV, HD, device=DEV, dtype=BF16)
    v_pool = torch.empty_like(k_pool)
    kv_new = torch.randn(tokens, HKV, HD, device=DEV, dtype=BF16)
    e = 2  # bytes per bf16 element
    cases: list[tuple[str, Callable[[], object], float]] = [
        ("rms_norm 8192x4096", lambda: rms_norm(x, w, 1e-6), 2 * x.numel() * e),
        ("fused_add_rms_norm 8192x4096", lambda: fused_add_rms_norm(x, res, w, 1e-6), 4 * x.numel() * e),
        ("apply_rope 8192x(32+8)x128", lambda: apply_rope(q, k, pos, cache),
         2 * (q.numel() + k.numel()) * e + tokens * HD * 4),
        ("silu_and_mul 8192x14336", lambda: silu_and_mul(gate_up), 3 * tokens * inter * e),
        ("store_kv 8192 tokens", lambda: store_kv(k_pool, v_pool, slots, kv_new, kv_new),
         4 * kv_new.numel() * e),
    ]  # fmt: skip
    rows = []
    for name, fn, nbytes in cases:
        ms = median_ms(fn)
        rows.append({"name": name, "ms": ms, "gbs": nbytes / ms / 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    parser.add_argument("--sweep-extend", action="store_true", help="only sweep extend tiles")
    args = parser.parse_args()
    if args.sweep_extend:
        rows = sweep_extend(8, 1024, 16)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sweep_extend.json").write_text(json.dumps(rows, indent=2))
        return
    assert torch.cuda.is_available(), "bench_kernels needs a CUDA GPU"
    props = torch.cuda.get_device_properties(DEV)
    started = time.time()
    result: dict = {"device": props.name, "sms": props.multi_processor_count,
                    "torch": torch.__version__, "triton": triton.__version__}  # fmt: skip
    copy_bw = copy_bandwidth_gbs()
    mm = matmul_tflops()
    result.update(copy_gbs=copy_bw, matmul_tflops=mm)
    print(f"{props.name}: copy {copy_bw:.0f} GB/s (read+write), bf16 matmul {mm:.0f} TFLOP/s")

    sms = props.multi_processor_count
    decode_cases = {
        "decode 8x32k p16": (8, 32768, 16, [4, 8, 16, 32, 64]),
        "decode 8x32k p1": (8, 32768, 1, [16, 32]),
        "decode 256x1k p16": (256, 1024, 16, [1, 2, 4]),
    }
    result["decode"] = {}
    lines = []
    for name, (b, s, ps, splits) in decode_cases.items():
        chosen = choose_num_splits(b, HKV, sms, 32)
        rows = bench_decode(b, s, ps, sorted(set(splits + [chosen])))
        result["decode"][name] = {"default_splits": chosen, "rows": rows}
        for r in rows:
            tag = " (default)" if r["splits"] == chosen else ""
            lines.append(f"{name} splits={r['splits']}{tag}: {r['ms'] * 1e3:.1f} us, "
                         f"{r['gbs']:.0f} GB/s = {r['gbs'] / copy_bw:.0%} of copy")  # fmt: skip
            print(lines[-1], flush=True)

    result["extend"] = {}
    for name, (b, n, p, ps) in {
        "extend 8x1024 p16": (8, 1024, 0, 16),
        "extend 8x1024 p1": (8, 1024, 0, 1),
        "extend 8x1024 +1024 prefix p16": (8, 1024, 1024, 16),
    }.items():
        r = bench_extend(b, n, p, ps)
        result["extend"][name] = r
        lines.append(f"{name}: {r['ms'] * 1e3:.1f} us, {r['tflops']:.0f} TFLOP/s "
                     f"= {r['tflops'] / mm:.0%} of matmul")  # fmt: skip
        print(lines[-1], flush=True)
    r = bench_sdpa(8, 1024)
    result["extend"]["torch sdpa 8x1024 dense"] = r
    lines.append(f"torch sdpa 8x1024 dense (reference): {r['ms'] * 1e3:.1f} us, "
                 f"{r['tflops']:.0f} TFLOP/s")  # fmt: skip
    print(lines[-1], flush=True)

    result["elementwise"] = bench_elementwise()
    for r in result["elementwise"]:
        lines.append(f"{r['name']}: {r['ms'] * 1e3:.1f} us, {r['gbs']:.0f} GB/s = "
                     f"{r['gbs'] / copy_bw:.0%} of copy")  # fmt: skip
        print(lines[-1], flush=True)

    result["seconds"] = time.time() - started
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_kernels.json").write_text(json.dumps(result, indent=2))
    print("\n=== summary ===")
    print(f"{props.name}: copy {copy_bw:.0f} GB/s, bf16 matmul {mm:.0f} TFLOP/s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
