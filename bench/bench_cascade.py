"""Shared-prefix (cascade) decode: kernel time and correctness at the Llama-3-8B shape, the host
cost of grouping, and an end-to-end gsp run with cascade on vs off.

    python bench/bench_cascade.py kernel [--out DIR]        CUDA: per-request decode vs cascade
                                                            at batch 256 (16 groups x 16, 2048
                                                            shared + 128..384 own), pass-1 sweep
    python bench/bench_cascade.py host [--out DIR]          any device: grouping + packing cost
    python bench/bench_cascade.py e2e --cascade on|off      gsp through the engine (one process
                                  [--scale S] [--out DIR]   per variant), then a greedy agreement batch
    python bench/bench_cascade.py compare [--out DIR]       speed-up + greedy agreement at real
                                                            margins (cascade_agreement.py)

Results are JSON files in DIR ($OUT, else bench/results/cascade); ``compare`` writes summary.md.
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radixrt.attention.cascade_plan import pack_cascade  # noqa: E402
from radixrt.engine.batch import ForwardBatch, build_forward_batch  # noqa: E402
from radixrt.engine.cascade_groups import CascadeGroups, CascadePolicy  # noqa: E402

HQ, HKV, HD = 32, 8, 128  # Llama-3-8B attention


def _out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out or os.environ.get("OUT") or "bench/results/cascade")
    out.mkdir(parents=True, exist_ok=True)
    return out


def shared_batch(groups: int, per_group: int, shared: int, suffix: tuple[int, int],
                 page_size: int, device: str, seed: int = 0) -> tuple[ForwardBatch, int]:
    """A decode batch of ``groups`` x ``per_group`` requests, each group sharing ``shared``
    tokens (the same pages), each request with its own suffix; members interleaved, pages
    shuffled over the pool. Returns (batch with .cascade set, pool slots)."""
    rng = np.random.default_rng(seed)
    shared_pages = shared // page_size
    tables, lens, owner = [], [], []
    next_page = 1
    for g in range(groups):
        common = list(range(next_page, next_page + shared_pages))
        next_page += shared_pages
        for _ in range(per_group):
            own = int(rng.integers(suffix[0], suffix[1] + 1))
            n = -(-own // page_size)
            tables.append(common + list(range(next_page, next_page + n)))
            next_page += n
            lens.append(shared + own)
            owner.append(g)
    perm = rng.permutation(len(tables))
    shuffle = rng.permutation(next_page - 1) + 1
    tables = [[int(shuffle[p - 1]) for p in tables[i]] for i in perm]
    lens = [lens[i] for i in perm]
    batch = build_forward_batch(new_token_ids=[[1]] * len(lens), prefix_lens=[n - 1 for n in lens],
                                page_tables=tables, page_size=page_size, device=device)
    members: dict[int, list[int]] = {}
    for pos, i in enumerate(perm):
        members.setdefault(owner[i], []).append(pos)
    batch.cascade = CascadeGroups.of([(shared, members[g]) for g in range(groups)],
                                     batch.req_rows_cpu)
    return batch, next_page * page_size


def _fp32_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                    idx: list[int]) -> torch.Tensor:
    from radixrt.attention.torch_ref import gather_slots

    outs = []
    for b in idx:
        n = batch.prefix_lens_cpu[b] + 1
        slots = gather_slots(batch.page_table[batch.req_rows_cpu[b]], n, batch.page_size)
        kk = k[slots].float().repeat_interleave(HQ // HKV, dim=1)  # [L, Hq, D]
        vv = v[slots].float().repeat_interleave(HQ // HKV, dim=1)
        s = torch.einsum("hd,lhd->hl", q[b].float(), kk) * HD**-0.5
        outs.append(torch.einsum("hl,lhd->hd", torch.softmax(s, -1), vv))
    return torch.stack(outs)


def median_ms(device: str, fn: Callable[[], object]) -> float:
    """do_bench's median on CUDA; a few plain runs elsewhere (a CPU dry run of this script)."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    t = time.perf_counter()
    for _ in range(2):
        fn()
    return (time.perf_counter() - t) / 2 * 1e3


def kernel(args: argparse.Namespace) -> dict[str, Any]:
    from radixrt.attention.triton_backend import TritonAttentionBackend
    from radixrt.kernels.decode_attention import decode_partials

    dev = args.device

    def ms(fn: Callable[[], object]) -> float:
        return median_ms(dev, fn)

    torch.manual_seed(0)
    lo, hi = (int(x) for x in args.suffix.split(","))
    batch, slots = shared_batch(args.groups, args.per_group, args.shared, (lo, hi), 16, dev)
    groups = batch.cascade
    assert groups is not None
    k = torch.randn(slots, HKV, HD, device=dev, dtype=torch.bfloat16)
    v = torch.randn(slots, HKV, HD, device=dev, dtype=torch.bfloat16)
    q = torch.randn(batch.batch_size, HQ, HD, device=dev, dtype=torch.bfloat16)
    backend = TritonAttentionBackend(HQ, HKV, HD, HD**-0.5, device=dev,
                                     max_batch_size=batch.batch_size, cascade=CascadePolicy())
    plain = dataclasses.replace(batch, cascade=None)
    backend.prepare(plain)
    out_plain = backend.attend(q, k, v, plain)
    t_plain = ms(lambda: backend.attend(q, k, v, plain))
    backend.prepare(batch)
    out_casc = backend.attend(q, k, v, batch).clone()
    t_casc = ms(lambda: backend.attend(q, k, v, batch))
    buffers = backend.cascade_buffers
    assert buffers is not None
    meta = buffers.upload(groups, batch.batch_size)
    splits = backend.num_splits_for(batch.batch_size)
    t_suffix = ms(lambda: decode_partials(
        q, k, v, batch.seq_lens, batch.page_table, batch.req_rows, 16, HD**-0.5, splits,
        backend._part_out, backend._part_lse, min_split_len=backend.min_split_len,
        kv_starts=meta.kv_starts))
    def prepare_us(fresh: bool) -> float:
        t0 = time.perf_counter()
        for _ in range(50):  # fresh: a new grouping each step (pack + upload), else reused
            backend.prepare(dataclasses.replace(batch, cascade=dataclasses.replace(groups))
                            if fresh else batch)
        if dev == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 50 * 1e6
    idx = list(range(0, batch.batch_size, max(1, batch.batch_size // 32)))
    ref = _fp32_reference(q, k, v, batch, idx)
    seq = np.asarray(batch.prefix_lens_cpu) + 1
    kv_bytes = HKV * HD * 2 * 2  # K and V, bf16, per token
    plain_bytes = int(seq.sum()) * kv_bytes
    casc_tokens = int(seq.sum() - args.shared * (groups.members.shape[0] - groups.num_groups))
    res: dict[str, Any] = {
        "shape": {"batch": batch.batch_size, "groups": args.groups, "per_group": args.per_group,
                  "shared": args.shared, "suffix": [lo, hi], "page_size": 16,
                  "heads": [HQ, HKV, HD], "dtype": "bfloat16"},
        "device": torch.cuda.get_device_name() if dev == "cuda" else dev,
        "per_request_ms": t_plain, "cascade_ms": t_casc, "speedup": t_plain / t_casc,
        "cascade_suffix_pass_ms": t_suffix, "cascade_prefix_pass_and_merge_ms": t_casc - t_suffix,
        "per_request_GBps": plain_bytes / t_plain / 1e6,
        "cascade_min_bytes_GBps": casc_tokens * kv_bytes / t_casc / 1e6,
        "prepare_host_us": prepare_us(True), "prepare_same_groups_us": prepare_us(False),
        "max_abs_diff_cascade_vs_per_request": float((out_casc - out_plain).abs().max()),
        "max_abs_diff_cascade_vs_fp32": float((out_casc[idx].float() - ref).abs().max()),
        "max_abs_diff_per_request_vs_fp32": float((out_plain[idx].float() - ref).abs().max()),
    }
    print(json.dumps(res, indent=1), flush=True)
    res["sweep"] = sweep_pass1(args, backend, q, k, v, batch)
    if res["sweep"]:
        res["best"] = min(res["sweep"], key=lambda r: r["ms"])
    name = f"kernel_{args.tag}.json" if args.tag else "kernel.json"
    (_out_dir(args) / name).write_text(json.dumps(res, indent=1))
    return res


def sweep_pass1(args: argparse.Namespace, backend: Any, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, batch: ForwardBatch) -> list[dict[str, Any]]:
    """Whole cascade step time over pass-1 launch settings and item targets (the backend's
    defaults first), within ``args.sweep_s`` seconds."""
    from radixrt.kernels.cascade_decode import CascadeLaunch, cascade_decode

    buffers = backend.cascade_buffers
    groups = batch.cascade
    assert buffers is not None and groups is not None
    t0 = buffers.budget.item_target
    # Run 1 (bench/recorded/h200_s4_cascade1) swept block_n x warps x stages: 64 / 4 / 3 won,
    # 2 stages lost up to 67%; now the item target around the default, then the runners-up.
    cap = buffers.budget.item_cap
    configs = [(t0, 64, 4, 3)]
    configs += [(t, 64, 4, 3) for t in sorted({max(1, t0 // 2), min(2 * t0, cap),
                                               min(4 * t0, cap)} - {t0})]
    configs += [(t0, 64, 4, 4), (t0, 128, 4, 3), (t0, 32, 4, 3), (t0, 64, 8, 3), (t0, 128, 8, 3)]
    # Each with pass 1 on the backend's side stream (its default), then the default without.
    plan = [(c, True) for c in configs]
    plan.insert(1, (configs[0], False))
    deadline = time.perf_counter() + args.sweep_s
    rows = []
    side_stream = backend._side_stream
    for (target, bn, w, st), side in plan:
        if time.perf_counter() > deadline:
            break
        if target > buffers.budget.item_cap or target < 1:
            continue
        budget = dataclasses.replace(buffers.budget, item_target=target)
        meta = buffers.upload(groups, batch.batch_size, budget)

        def run(meta: Any = meta, target: int = target, bn: int = bn, w: int = w,
                st: int = st, side: bool = side) -> None:
            cascade_decode(q, k, v, batch.seq_lens, batch.page_table, batch.req_rows, 16,
                           HD**-0.5, meta, buffers.tiling,
                           num_splits=backend.num_splits_for(batch.batch_size),
                           prefix_programs=target, suf_out=backend._part_out,
                           suf_lse=backend._part_lse, pre_out=buffers.pre_out,
                           pre_lse=buffers.pre_lse, launch=CascadeLaunch(bn, w, st),
                           side_stream=side_stream if side else None)

        try:
            t_ms = median_ms(args.device, run)
        except Exception as e:  # a config Triton cannot build (e.g. shared memory): skip it
            print(f"sweep {target=} {bn=} {w=} {st=}: {type(e).__name__}: {e}", flush=True)
            continue
        rows.append({"item_target": target, "block_n": bn, "num_warps": w, "num_stages": st,
                     "side_stream": side, "ms": t_ms})
        print(f"sweep items/head {target:4d} block_n {bn:3d} warps {w} stages {st} side stream "
              f"{side}: {t_ms:.4f} ms", flush=True)
    return rows


def host(args: argparse.Namespace) -> dict[str, Any]:
    """Grouping (radix-tree walk) + packing per decode step for 256 running sequences."""
    from radixrt.attention.cascade_plan import ItemBudget
    from radixrt.cache.allocator import PageAllocator
    from radixrt.cache.page_table import SequencePages
    from radixrt.cache.radix import RadixCache
    from radixrt.engine.cascade_groups import PrefixGrouper
    from radixrt.engine.request import Sequence
    from radixrt.kernels.cascade_meta import PrefixTiling
    from radixrt.sampling_params import SamplingParams

    ps, rng = 16, np.random.default_rng(0)
    alloc = PageAllocator(args.groups * args.per_group * 200)
    cache = RadixCache(alloc, ps)
    seqs: list[Sequence] = []
    for g in range(args.groups):
        system = rng.integers(3, 30000, args.shared).tolist()
        for i in range(args.per_group):
            toks = system + rng.integers(3, 30000, 128).tolist()
            fresh = alloc.alloc(len(toks) // ps)
            assert fresh is not None
            ins = cache.insert(np.asarray(toks), fresh)
            cache.lock(ins.handle)
            seq = Sequence(rid=f"{g}-{i}", index=0, prompt_ids=toks, params=SamplingParams(),
                           namespace=None, arrival=len(seqs), pages=SequencePages(ps))
            seq.pages.pages, seq.cache_handle, seq.kv_len = list(ins.pages), ins.handle, len(toks)
            seqs.append(seq)
    grouper = PrefixGrouper(CascadePolicy(), ps)
    rows, kv = list(range(1, len(seqs) + 1)), [s.kv_len for s in seqs]
    tiling = PrefixTiling(block_m=64, tile_reqs=16, max_items=16)
    budget = ItemBudget(item_target=66, item_cap=max(66, len(seqs) // 2), min_chunk=256, block_n=64)
    grouper.group(seqs, rows, kv)  # fills the path cache, as the first decode step does
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        groups = grouper.group(seqs, rows, kv)  # the batch of the previous step: memo hit
    t_same = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(n):  # one request replaced every step: a fresh grouping (paths cached)
        rows[i % len(rows)] += 1000
        groups = grouper.group(seqs, rows, kv)
    t_group = (time.perf_counter() - t0) / n
    assert groups is not None and groups.num_groups == args.groups
    t0 = time.perf_counter()
    for _ in range(n):
        pack_cascade(groups, len(seqs), tiling, budget, len(seqs))
    t_pack = (time.perf_counter() - t0) / n
    res = {"sequences": len(seqs), "groups": groups.num_groups, "group_us": t_group * 1e6,
           "group_unchanged_batch_us": t_same * 1e6, "pack_us": t_pack * 1e6}
    print(json.dumps(res), flush=True)
    (_out_dir(args) / "host.json").write_text(json.dumps(res, indent=1))
    return res


def e2e(args: argparse.Namespace) -> dict[str, Any]:
    from bench.metrics import compute_metrics
    from bench.offline import run_offline, warmup
    from bench.workloads import make_workload
    from radixrt.config import EngineConfig
    from radixrt.engine.core import EngineCore

    cfg = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                       load_format="dummy", page_size=16, kv_cache_tokens=args.kv_tokens,
                       max_running_requests=256, cascade_decode=args.cascade, seed=0)
    t0 = time.perf_counter()
    core = EngineCore(cfg)
    setup_s = time.perf_counter() - t0
    vocab = core.model_info.vocab_size
    warmup(core, vocab)
    workload = make_workload("gsp", vocab, seed=0, scale=args.scale, len_scale=args.len_scale)
    steps: list[tuple[float, int, int]] = []  # (seconds, running, prefilling)
    step = core.step

    def timed() -> Any:
        t = time.perf_counter()
        deltas = step()
        running = core.scheduler.running
        steps.append((time.perf_counter() - t, len(running), sum(s.in_prefill for s in running)))
        return deltas

    core.step = timed  # type: ignore[method-assign]
    grouper = core.runner.cascade
    g0 = (grouper.grouped_steps, grouper.grouped_requests) if grouper else (0, 0)
    out = run_offline(core, workload, progress=False)
    m = compute_metrics(out.records, out.duration_s)
    big = max(r for _, r, _ in steps)
    decode = [t for t, r, p in steps if p == 0 and r >= 0.9 * big]
    res: dict[str, Any] = {
        "cascade": args.cascade, "model": args.model, "scale": args.scale,
        "workload": dict(workload.params), "requests": workload.num_requests,
        "setup_s": setup_s, "duration_s": out.duration_s, "output_tok_s": m.output_throughput,
        "itl_ms": {"mean": m.itl_s.mean * 1e3, "p50": m.itl_s.p50 * 1e3, "p99": m.itl_s.p99 * 1e3},
        "ttft_ms_mean": m.ttft_s.mean * 1e3, "hit_rate": m.hit_rate,
        "decode_step_ms_p50": float(np.median(decode)) * 1e3 if decode else None,
        "decode_steps_measured": len(decode), "max_running": big, "steps": len(steps),
        "grouped_steps": grouper.grouped_steps - g0[0] if grouper else 0,
        "grouped_requests_per_step": ((grouper.grouped_requests - g0[1])
                                      / max(1, grouper.grouped_steps - g0[0])) if grouper else 0,
    }
    print(json.dumps(res, indent=1), flush=True)
    if args.agree_tokens > 0:  # after the timed run: top-2 logprobs cost a little per step
        from bench.cascade_agreement import collect

        res["agreement"] = collect(core, vocab, tokens=args.agree_tokens,
                                     len_scale=args.len_scale)
    (_out_dir(args) / f"e2e_{args.cascade}.json").write_text(json.dumps(res))
    return res


def compare(args: argparse.Namespace) -> int:
    out = _out_dir(args)
    lines = ["# Cascade decode (bench/bench_cascade.py)", ""]
    for kpath in sorted(out.glob("kernel*.json")):
        k = json.loads(kpath.read_text())
        lines += [f"Kernel, {k['device']}, {k['shape']}:", "",
                  f"- per-request decode {k['per_request_ms']:.3f} ms "
                  f"({k['per_request_GBps']:.0f} GB/s), cascade {k['cascade_ms']:.3f} ms: "
                  f"{k['speedup']:.2f}x (own suffixes {k['cascade_suffix_pass_ms']:.3f} ms, "
                  f"shared prefixes + merge {k['cascade_prefix_pass_and_merge_ms']:.3f} ms)",
                  f"- max |cascade - per-request| {k['max_abs_diff_cascade_vs_per_request']:.2e}; "
                  f"vs fp32: cascade {k['max_abs_diff_cascade_vs_fp32']:.2e}, per-request "
                  f"{k['max_abs_diff_per_request_vs_fp32']:.2e}",
                  f"- prepare: new groups (pack + upload) {k['prepare_host_us']:.0f} us/step, "
                  f"previous step's groups {k['prepare_same_groups_us']:.0f} us/step"]
        if k.get("best"):
            lines.append(f"- best pass-1 config: {k['best']}")
        lines.append("")
    runs = {m: json.loads((out / f"e2e_{m}.json").read_text())
            for m in ("on", "off") if (out / f"e2e_{m}.json").exists()}
    for m, r in runs.items():
        lines.append(f"- gsp cascade {m}: {r['duration_s']:.2f} s, {r['output_tok_s']:.0f} out "
                     f"tok/s, ITL mean {r['itl_ms']['mean']:.2f} ms (p50 {r['itl_ms']['p50']:.2f}),"
                     f" decode step p50 {r['decode_step_ms_p50']} ms at running {r['max_running']},"
                     f" hit {r['hit_rate']:.3f}, grouped steps {r['grouped_steps']} "
                     f"({r['grouped_requests_per_step']:.0f} req/step)")
    if len(runs) == 2:
        from bench.cascade_agreement import summarize, summary_lines

        on, off = runs["on"], runs["off"]
        lines += ["", f"- time on/off {on['duration_s'] / off['duration_s']:.3f}, ITL on/off "
                  f"{on['itl_ms']['mean'] / off['itl_ms']['mean']:.3f}"]
        if "agreement" in on and "agreement" in off:
            agree = summarize(on["agreement"], off["agreement"])
            (out / "agreement.json").write_text(json.dumps(agree, indent=1))
            lines += summary_lines(agree)
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=("kernel", "host", "e2e", "compare"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--per-group", type=int, default=16)
    ap.add_argument("--shared", type=int, default=2048)
    ap.add_argument("--suffix", default="128,384", help="own suffix length range LO,HI")
    ap.add_argument("--sweep-s", type=float, default=60.0, help="pass-1 sweep time budget")
    ap.add_argument("--tag", default="", help="kernel: results in kernel_TAG.json (another shape)")
    ap.add_argument("--cascade", choices=("on", "off"), default="on")
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-tokens", type=int, default=262144)
    ap.add_argument("--scale", type=float, default=1.0, help="gsp request-count scale")
    ap.add_argument("--len-scale", type=float, default=1.0, help="gsp length scale")
    ap.add_argument("--agree-tokens", type=int, default=64,
                    help="greedy tokens of the agreement batch after the timed run (0: none)")
    args = ap.parse_args(argv)
    if args.mode == "kernel":
        kernel(args)
    elif args.mode == "host":
        host(args)
    elif args.mode == "e2e":
        e2e(args)
    else:
        return compare(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
