"""Prefill attention on torch's fused SDPA ops vs the paged Triton kernel (issue 18, item 1).

    python3 bench/sdpa_probe.py --out $OUT            # GPU: ~1-2 min on an H200
    python3 bench/sdpa_probe.py --tiny --device cpu   # logic check (math stand-in for the ops)

1. What the ops do here: for cuDNN's and flash's SDPA with log-sum-exp, whether they take GQA
   (fewer K/V heads) natively, and how their causal mask aligns when queries < keys
   (bottom-right = each query sees the whole prefix, top-left = not).
2. Rates (% of a same-run bf16 matmul, useful causal FLOPs) of the engine's current extend path
   (``extend_attention``, default configs, new K/V dense), ``dense_extend`` (prefix gathered from
   shuffled pages, every part on SDPA, merged; cuDNN first, then with flash only), and the raw
   op on pre-built dense tensors (the ceiling without gathers), at prefill shapes from 8 x 1024
   to one 8k chunk after a 112k prefix. Every variant is checked against an fp32 reference.
Writes sdpa_probe.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prefill import PAGE, TOL, Case, matmul_tflops, softmax_scale, timer  # noqa: E402

from radixrt.kernels import extend_dense  # noqa: E402
from radixrt.kernels.extend_attention import extend_attention  # noqa: E402

SHAPES = {"8x1024": (8, 1024, 0), "8x2048": (8, 2048, 0), "8x1024 +1k prefix": (8, 1024, 1024),
          "1x32k": (1, 32768, 0), "1x8k +24k prefix": (1, 8192, 24576),
          "1x8k +112k prefix": (1, 8192, 112000)}
TINY_SHAPES = {"2x40": (2, 40, 0), "2x24 +33 prefix": (2, 24, 33)}
HEADS = (32, 8, 128)


def _op(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
        scale: float) -> torch.Tensor:
    if name == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention(  # type: ignore[no-any-return]
            q, k, v, None, True, 0.0, causal, False, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_flash_attention(  # type: ignore[no-any-return]
        q, k, v, 0.0, causal, False, scale=scale)[0]


def _ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         scale: float) -> torch.Tensor:
    k = k.float().repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.float().repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = (q.float() @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def _math_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU stand-in for the fused ops (a logic check of the probe, not a rate)."""
    k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v.float(), torch.logsumexp(s, -1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def semantics(device: torch.device) -> dict[str, Any]:
    """GQA support and causal alignment of each op on small inputs."""
    res: dict[str, Any] = {}
    e, p, d = 64, 128, 128
    q = torch.randn(1, 32, e, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 8, p + e, d, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sc = softmax_scale(d)
    rows = torch.arange(e, device=device)[:, None]
    cols = torch.arange(p + e, device=device)[None, :]
    bottom_right, top_left = cols <= rows + p, cols <= rows
    for name in ("cudnn", "flash"):
        r: dict[str, Any] = {}
        ke, ve = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        try:
            out = _op(name, q, k[:, :, :e], v[:, :, :e], True, sc)
            r["gqa_native_err"] = _rel(out, _ref(q, k[:, :, :e], v[:, :, :e], top_left[:, :e], sc))
        except Exception as exc:  # noqa: BLE001 - what the op refuses is the finding
            r["gqa_native_err"] = repr(exc)[:160]
        try:
            out = _op(name, q, ke, ve, True, sc)
            r["causal_bottom_right_err"] = _rel(out, _ref(q, k, v, bottom_right, sc))
            r["causal_top_left_err"] = _rel(out, _ref(q, k, v, top_left, sc))
        except Exception as exc:  # noqa: BLE001
            r["causal_rect_error"] = repr(exc)[:160]
        try:
            qs = q[0].transpose(0, 1).contiguous().transpose(0, 1).unsqueeze(0)  # strided view
            out = _op(name, qs, ke[:, :, :e], ve[:, :, :e], True, sc)
            r["strided_q_err"] = _rel(out, _ref(q, k[:, :, :e], v[:, :, :e], top_left[:, :e], sc))
        except Exception as exc:  # noqa: BLE001
            r["strided_q_err"] = repr(exc)[:160]
        res[name] = r
        print(name, r, flush=True)
    return res


def rate(case: Case, fn: Callable[[torch.Tensor], object], mm: float,
         ms: Callable[[Callable[[], object]], float]) -> dict[str, Any]:
    out = torch.full_like(case.q, float("nan"))
    try:
        fn(out)
        err = case.err(out)
        t = ms(lambda: fn(out))
    except Exception as exc:  # noqa: BLE001 - an op this torch build lacks
        return {"error": repr(exc)[:300]}
    tf = case.flops / t / 1e9
    return {"ms": round(t, 4), "pct_of_matmul": round(100 * tf / mm, 1), "rel_err": err,
            "correct": bool(err < TOL)}


def raw_ceiling(case: Case, name: str, mm: float,
                ms: Callable[[Callable[[], object]], float]) -> dict[str, Any]:
    """The op alone on dense, head-expanded tensors: new x new causal plus prefix x new full."""
    b, n, p = case.batch, case.new, case.prefix
    hq, _, hd = HEADS
    dev, sc = case.q.device, softmax_scale(hd)
    q = torch.randn(b, hq, n, hd, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hq, n, hd, device=dev, dtype=torch.bfloat16)
    kp = torch.randn(b, hq, p, hd, device=dev, dtype=torch.bfloat16) if p else None

    def run() -> None:
        _op(name, q, k, k, True, sc)
        if kp is not None:
            _op(name, q, kp, kp, False, sc)

    try:
        t = ms(run)
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)[:300]}
    return {"ms": round(t, 4), "pct_of_matmul": round(100 * case.flops / t / 1e9 / mm, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--shapes", default="", help="comma-separated subset of the shape names")
    a = ap.parse_args()
    dev = torch.device(a.device)
    ms = timer(dev)
    mm = matmul_tflops(dev, ms)
    res: dict[str, Any] = {"matmul_tflops": mm, "device": torch.cuda.get_device_name()
                           if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    print(f"matmul {mm:.0f} TFLOP/s", flush=True)
    if dev.type == "cuda":
        res["semantics"] = semantics(dev)
        res["cudnn_version"] = torch.backends.cudnn.version()
    else:
        extend_dense.sdpa_with_lse = _math_sdpa  # type: ignore[assignment]
    shapes = TINY_SHAPES if a.tiny else SHAPES
    if a.shapes:
        shapes = {k: v for k, v in shapes.items() if k in a.shapes.split(",")}
    heads = (8, 2, 64) if a.tiny else HEADS
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    res["shapes"] = {}
    for name, (b, n, p) in shapes.items():
        case = Case(b, n, p, dev, dtype, heads)
        sc = softmax_scale(heads[2])  # the same for every shape
        h = {"extend_lens": [n] * b, "prefix_lens": [p] * b, "rows": case.rows.tolist()}

        def ours(o: torch.Tensor, c: Case = case, sc: float = sc) -> object:
            return extend_attention(c.q, c.k, c.v, c.indptr, c.prefix_lens, c.table, c.rows, PAGE,
                                    c.new, sc, out=o, max_seq_len=c.prefix + c.new,
                                    k_new=c.k_new, v_new=c.v_new)

        def dense(o: torch.Tensor, c: Case = case, hh: dict[str, Any] = h,
                  sc: float = sc) -> object:
            return extend_dense.dense_extend(c.q, c.k, c.v, c.k_new, c.v_new, c.table, PAGE, sc,
                                             hh["extend_lens"], hh["prefix_lens"], hh["rows"], o)

        row: dict[str, Any] = {"batch": b, "new": n, "prefix": p}
        if dev.type == "cuda":
            row["ours"] = rate(case, ours, mm, ms)
        extend_dense._WORKS.clear()
        row["dense_extend"] = rate(case, dense, mm, ms)
        row["dense_ops"] = dict(extend_dense._WORKS)
        if dev.type == "cuda":
            extend_dense._WORKS.update({"cudnn": False, "cudnn-contiguous": False})
            row["dense_extend_flash"] = rate(case, dense, mm, ms)
            extend_dense._WORKS.clear()
            row["raw_cudnn"] = raw_ceiling(case, "cudnn", mm, ms)
            row["raw_flash"] = raw_ceiling(case, "flash", mm, ms)
        res["shapes"][name] = row
        print(name, json.dumps(row), flush=True)
        del case
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "sdpa_probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
