"""Where the GPU time of a constrained decode step goes: 256 JSON-schema-constrained requests
on the llama3-8b shape (dummy weights), a few steps under torch.profiler, the top ops by CUDA
time and by CPU time. Diagnostic for bench_grammar's constrained-vs-unconstrained ratio.

    python bench/profile_grammar.py [--tokenizer .whl/tok] [--batch 256] [--steps 8]
        [--grammar-config fused:default|unfused:default|fused:N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grammar import LONG, load_tokenizer  # noqa: E402
from grammar_steps import parse_configs, use_config  # noqa: E402

from radixrt import Engine, SamplingParams  # noqa: E402
from radixrt.constrained.sequences import SequenceGrammars  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".whl/tok")
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--grammar-config", default="fused:default", help="e.g. unfused:default")
    a = ap.parse_args()
    tok = load_tokenizer(a.tokenizer)
    eng = Engine(a.preset, load_format="dummy", device="cuda", dtype="bfloat16", page_size=16,
                 max_running_requests=a.batch, mem_fraction=0.80)
    core = eng.core
    core.scheduler.results.grammars = SequenceGrammars(
        tok, core.args.vocab_size, "cuda", core.model_info.eos_token_ids)
    use_config(core.scheduler.results.grammars, parse_configs(a.grammar_config)[0])
    p = SamplingParams(temperature=0.7, max_new_tokens=a.steps + 40, json_schema=json.dumps(LONG))
    for i in range(a.batch):
        core.add_request(f"c{i}", [100 + i % 50, 200 + i, 300], p)
    for _ in range(10):  # prefill + warm-up
        core.step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.steps):
            core.step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
