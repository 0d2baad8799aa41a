"""Tensor-parallel benchmarks (issue 16): decode step and end to end at TP=N, against floors.

    python bench/bench_tp.py --preset llama3-8b --tp 2 --out DIR     one run -> DIR/<preset>_tp<N>.json
    python bench/bench_tp.py --report DIR                            DIR/tp.md + the issue's targets

- allreduce: measured on N fresh processes over the same TPGroup the engine uses (NCCL on CUDA):
             the decode step's activation all-reduce [batch, hidden] and the logits all-gather.
- decode:    batch x ctx-token contexts (random ids, dummy weights), wall time per step with the
             overlap scheduler on; floor = (weights + KV read) / N / copy bandwidth
             + 2 x layers all-reduces + 1 embedding all-reduce + 1 logits all-gather (measured).
- e2e:       128 prompts x 512 in / 128 out; floor = the single-GPU workload floor / N + the
             collectives of every decode step.
Targets (issue 16): llama3-8b TP=2 decode step <= 0.6x TP=1; llama3-70b TP=4 decode step at
batch 64 <= 1.3x its floor.
CPU dry run (tiny model, gloo, seconds; floors need CUDA and read null):
    python bench/bench_tp.py --device cpu --preset llama-tiny --tp 2 --batch 4 --ctx 64 \
        --steps 4 --e2e 4,32,8 --out /tmp/tp && python bench/bench_tp.py --report /tmp/tp
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import measure_ceilings, model_numbers, rand_prompts  # noqa: E402

from radixrt import Engine, SamplingParams  # noqa: E402
from radixrt.distributed.group import TPGroup, free_port  # noqa: E402
from radixrt.models.args import ModelArgs  # noqa: E402
from radixrt.models.presets import preset_config  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _collective_rank(rank: int, size: int, port: int, device: str, shapes: dict[str, Any],
                     dtype: torch.dtype, out: Any) -> None:
    dev = torch.device("cuda", rank) if device.startswith("cuda") else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    tp = TPGroup.connect(rank, size, port, dev)
    x = torch.randn(shapes["activations"], dtype=dtype, device=dev)
    logits = torch.randn(shapes["logits"], dtype=dtype, device=dev)
    res = {}
    for name, fn in (("allreduce_us", lambda: tp.all_reduce(x)),
                     ("allgather_us", lambda: tp.all_gather_last(logits))):
        for _ in range(5):
            fn()
        times = []
        for _ in range(30):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t) * 1e6)
        res[name] = statistics.median(times)
    if rank == 0:
        out.put(res)
    tp.close()


def measure_collectives(tp: int, batch: int, args: ModelArgs, device: str,
                        dtype: torch.dtype) -> dict[str, float]:
    if tp == 1:
        return {"allreduce_us": 0.0, "allgather_us": 0.0}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    shapes = {"activations": (batch, args.hidden_size),
              "logits": (batch, -(-args.vocab_size // tp))}
    procs = [ctx.Process(target=_collective_rank, args=(r, tp, port, device, shapes, dtype, q))
             for r in range(tp)]
    for p in procs:
        p.start()
    res: dict[str, float] = q.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return res


def run_decode(eng: Engine, batch: int, ctx: int, steps: int, vocab: int,
               device: str) -> float:
    core = eng.core
    p = SamplingParams(temperature=0, max_new_tokens=steps + 8, ignore_eos=True)
    for i, ids in enumerate(rand_prompts(batch, ctx, vocab, 1)):
        core.add_request(f"d{i}", ids, p)
    while any(s.in_prefill for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    for _ in range(3):  # the decode batch settles (and its graph is warm)
        core.step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        core.step()
    _sync(device)
    step_ms = (time.perf_counter() - t) * 1e3 / steps
    while core.has_work():
        core.step()
    return step_ms


def run_e2e(eng: Engine, n: int, prompt_len: int, out_len: int, vocab: int, device: str) -> float:
    prompts = rand_prompts(n, prompt_len, vocab, 7)
    eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    eng.flush_cache()
    _sync(device)
    t = time.perf_counter()
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=out_len,
                                                ignore_eos=True))
    _sync(device)
    assert all(len(o.token_ids) == out_len for o in outs), "every request must finish its tokens"
    return time.perf_counter() - t


def one_run(a: argparse.Namespace) -> dict[str, Any]:
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    margs = ModelArgs.from_hf_config(preset_config(a.preset))
    nums = model_numbers(margs)
    n, plen, olen = (int(x) for x in a.e2e.split(","))
    res: dict[str, Any] = {"preset": a.preset, "tp": a.tp, "batch": a.batch, "ctx": a.ctx,
                           "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"}
    res.update(measure_collectives(a.tp, a.batch, margs, a.device, dtype))
    print("collectives", res, flush=True)
    ceil = measure_ceilings("cuda") if a.device.startswith("cuda") else None
    t = time.perf_counter()
    eng = Engine(a.preset, load_format="dummy", device=a.device, dtype=str(dtype).split(".")[-1],
                 tp_size=a.tp, page_size=16, max_running_requests=max(a.batch, n),
                 cuda_graph_max_batch=max(a.batch, n), mem_fraction=0.80,
                 kv_cache_tokens=a.kv_tokens)
    res["engine_start_s"] = time.perf_counter() - t
    try:
        res["decode_step_ms"] = run_decode(eng, a.batch, a.ctx, a.steps, margs.vocab_size, a.device)
        res["e2e_s"] = run_e2e(eng, n, plen, olen, margs.vocab_size, a.device)
    finally:
        eng.core.close()
    # Per step: one all-reduce after attention and one after the MLP per layer, one for the
    # vocab-parallel embedding, one all-gather of the logits.
    coll_ms = ((2 * margs.num_layers + 1) * res["allreduce_us"] + res["allgather_us"]) / 1e3
    res["collectives_per_step_ms"] = coll_ms
    if ceil is not None:
        bw = ceil["copy_bw_Bps"]
        kv_read = a.batch * (a.ctx + a.steps / 2) * nums["kv_bytes_per_token"]
        res["decode_floor_ms"] = (nums["weight_bytes"] + kv_read) / a.tp / bw * 1e3 + coll_ms
        res["decode_vs_floor"] = res["decode_step_ms"] / res["decode_floor_ms"]
        kv = sum(n * (plen + j) for j in range(olen)) * nums["kv_bytes_per_token"]
        pf = 2 * nums["matmul_params"] * n * plen / ceil["matmul_flops"]
        dec = (olen * nums["weight_bytes"] + kv) / bw
        res["e2e_floor_s"] = (pf + dec) / a.tp + olen * coll_ms / 1e3
        res["e2e_vs_floor"] = res["e2e_s"] / res["e2e_floor_s"]
        res.update(ceil)
    else:
        res["decode_floor_ms"] = res["e2e_floor_s"] = None
    return res


def report(out_dir: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*_tp*.json"))]
    lines = ["| preset | TP | batch x ctx | decode ms | floor ms | vs floor | all-reduce us | "
             "e2e s | e2e floor s |", "|---|---|---|---|---|---|---|---|---|"]

    def f(x: Any, p: str = ".2f") -> str:
        return "-" if x is None else format(x, p)

    for r in sorted(runs, key=lambda r: (r["preset"], r["tp"])):
        lines.append(f"| {r['preset']} | {r['tp']} | {r['batch']} x {r['ctx']} | "
                     f"{f(r['decode_step_ms'])} | {f(r['decode_floor_ms'])} | "
                     f"{f(r.get('decode_vs_floor'))} | {f(r['allreduce_us'], '.1f')} | "
                     f"{f(r['e2e_s'])} | {f(r['e2e_floor_s'])} |")
    by = {(r["preset"], r["tp"]): r for r in runs}
    lines.append("")
    if ("llama3-8b", 1) in by and ("llama3-8b", 2) in by:
        ratio = by["llama3-8b", 2]["decode_step_ms"] / by["llama3-8b", 1]["decode_step_ms"]
        lines.append(f"- llama3-8b decode TP=2 / TP=1 = {ratio:.3f} (target <= 0.6): "
                     f"{'met' if ratio <= 0.6 else 'MISSED'}")
    r70 = by.get(("llama3-70b", 4))
    if r70 is not None and r70.get("decode_vs_floor") is not None:
        v = r70["decode_vs_floor"]
        lines.append(f"- llama3-70b TP=4 decode at batch {r70['batch']} = {v:.3f}x its floor "
                     f"(target <= 1.3): {'met' if v <= 1.3 else 'MISSED'}")
    text = "\n".join(lines) + "\n"
    (out_dir / "tp.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/tp")
    ap.add_argument("--report", default=None, help="summarize the runs in this directory")
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--e2e", default="128,512,128", help="prompts,prompt_len,output_len")
    ap.add_argument("--kv-tokens", type=int, default=None, help="KV pool (default: free memory)")
    a = ap.parse_args()
    if a.report:
        print(report(Path(a.report)))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = one_run(a)
    (out / f"{a.preset}_tp{a.tp}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
