"""RAG over the host tier: a long document computed once, pushed off the GPU by other traffic,
then asked about again. Prints one JSON line per configuration (and writes them to --out).

    cold      TTFT of the first question (the whole document is prefilled)
    gpu_hit   TTFT of a second question right after (the document is on the GPU)
    after     TTFT of a third question once other documents (more than the GPU pool) ran:
              a host hit and a load with the tier on, a cold prefill again with it off
Target (issue 12): after <= cold / 5 with the tier on.

    python bench/bench_tier.py --device cuda --model llama3.1-8b --doc-tokens 120000 \\
        --kv-cache-tokens 150000 --host-kv-cache-tokens 800000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from radixrt.config import EngineConfig
from radixrt.engine.core import EngineCore
from radixrt.sampling_params import SamplingParams


def ttft(core: EngineCore, rid: str, prompt: list[int], max_new: int = 4) -> tuple[float, int]:
    """Seconds from submission to the first token, and the request's cached_tokens."""
    t0 = time.perf_counter()
    core.add_request(rid, prompt, SamplingParams(max_new_tokens=max_new, temperature=0.0,
                                                 ignore_eos=True))
    first, cached = None, 0
    while core.has_work():
        for d in core.step():
            if d.rid == rid:
                cached = d.cached_tokens
                if d.new_token_ids and first is None:
                    first = time.perf_counter() - t0
    assert first is not None, f"{rid} produced no token"
    return first, cached


def run(args: argparse.Namespace, host_tokens: int) -> dict[str, Any]:
    cfg = EngineConfig(
        model=args.model, load_format="dummy", device=args.device, dtype=args.dtype,
        kv_cache_tokens=args.kv_cache_tokens, host_kv_cache_tokens=host_tokens,
        max_context_len=args.doc_tokens + 256, chunked_prefill_size=args.chunk,
        max_prefill_tokens=args.chunk, seed=0,
    )
    core = EngineCore(cfg)
    vocab = core.model_info.vocab_size
    rng = np.random.default_rng(0)

    def tokens(n: int) -> list[int]:
        return rng.integers(3, vocab - 1, size=n).tolist()  # type: ignore[no-any-return]

    ttft(core, "warmup", tokens(min(4096, args.doc_tokens)))  # compile / allocator warm-up
    core.flush_cache()
    doc = tokens(args.doc_tokens)
    cold, c0 = ttft(core, "q1", doc + tokens(32))
    hit, c1 = ttft(core, "q2", doc + tokens(32))
    flood = 0
    while flood < args.flood_factor * args.kv_cache_tokens:  # other documents, each asked once
        n = min(args.doc_tokens, args.kv_cache_tokens // 2)
        ttft(core, f"other{flood}", tokens(n))
        flood += n
    after, c2 = ttft(core, "q3", doc + tokens(32))
    stats = core.stats()
    row = {
        "host_kv_cache_tokens": host_tokens, "kv_cache_tokens": args.kv_cache_tokens,
        "doc_tokens": args.doc_tokens, "flood_tokens": flood,
        "cold_s": round(cold, 4), "gpu_hit_s": round(hit, 4), "after_s": round(after, 4),
        "after_over_cold": round(after / cold, 4),
        "cached_tokens": [c0, c1, c2],
        "host": {k: v for k, v in stats.extra.items() if k.startswith("host_")},
    }
    del core
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--model", default="llama3.1-8b", help="a preset (dummy weights) with room "
                   "for the document: llama3.1-8b is the Llama-3-8B shape with 128k positions")
    p.add_argument("--doc-tokens", type=int, default=120_000)
    p.add_argument("--kv-cache-tokens", type=int, default=150_000)
    p.add_argument("--host-kv-cache-tokens", type=int, default=800_000)
    p.add_argument("--flood-factor", type=float, default=1.0,
                   help="other traffic, in multiples of the GPU pool")
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk (tokens per step)")
    p.add_argument("--tier", choices=("on", "off", "both"), default="both")
    p.add_argument("--out", default=None, help="JSON-lines file")
    args = p.parse_args()
    rows = []
    for host in {"on": [args.host_kv_cache_tokens], "off": [0],
                 "both": [args.host_kv_cache_tokens, 0]}[args.tier]:
        rows.append(run(args, host))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
