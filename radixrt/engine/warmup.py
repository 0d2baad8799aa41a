"""Start-up warm-up: run the kinds of step real traffic needs before the first request arrives.

A Triton kernel compiles on first launch for each new variant (0.2-2 s each on an H200), and the
step that launches it stalls every running request. CUDA-graph capture already compiles the
decode kernels; prefill has more variants: cold prompts, extends after a prefix-cache hit,
split-KV over a long prefix, shared-prefix (cascade) decode groups, long chunks, sampled rows.
On the H200 the chat workload's second turn (the first cache hits) paid ~2 s here
(bench/recorded/h200_s6_call2/suite: TTFT p99 2.04 s, turn 2 mean 1.06 s vs ~0.06 s later).

The warm-up runs a few small waves of synthetic requests through the real scheduler, then
empties the prefix cache; it reports what compiled (kernels/compile_log.py). Its requests count
in the engine's token totals, as any request would.

    wave 1  cold prompts (1, 37, 64, 300 tokens), greedy and sampled rows
    wave 2  the same prompts + new tokens: extends over a cached prefix
    wave 3  one cached prefix + 3 own suffixes decoding together: a cascade group
    wave 4  one long prompt (chunked), then a short extend over it: long chunks, split-KV
    then    the grammar bitmask kernel on dummy logits (CUDA)
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from radixrt.kernels.compile_log import CompileLog
from radixrt.sampling_params import SamplingParams

if TYPE_CHECKING:
    from radixrt.engine.core import EngineCore

logger = logging.getLogger(__name__)

COLD_LENS = (1, 37, 64, 300)  # odd / multiple-of-16 / one-token lengths specialize differently
LONG_TOKENS = 8192  # wave 4's prompt (capped by the context and the pool)


@dataclass(frozen=True)
class WarmupRequest:
    prompt: list[int]
    params: SamplingParams


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def _sampled(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.8, top_p=0.9, top_k=40, min_p=0.05,
                          ignore_eos=True, seed=1)


def plan_waves(vocab_size: int, max_context_len: int, pool_tokens: int, chunk_tokens: int,
               seed: int = 0) -> list[list[WarmupRequest]]:
    """The waves above, sized to fit the context window and a quarter of the pool."""
    gen = torch.Generator().manual_seed(seed)
    low = min(3, vocab_size - 1)  # above the usual special ids, where the vocabulary allows

    def tokens(n: int) -> list[int]:
        return torch.randint(low, vocab_size, (n,), generator=gen).tolist()

    room = max(2, min(max_context_len - 16, pool_tokens // 4))  # prompt + output must fit
    cold = [tokens(min(n, room)) for n in COLD_LENS]
    waves = [[WarmupRequest(p, _sampled(4) if i % 2 else _greedy(4)) for i, p in enumerate(cold)]]
    extended = [p + tokens(k) for p, k in zip(cold[1:], (5, 77, 20)) if len(p) + k <= room]
    waves.append([WarmupRequest(p, _greedy(4)) for p in extended])
    shared = cold[-1]
    if len(shared) + 20 <= room:
        waves.append([WarmupRequest(shared + tokens(20), _greedy(8)) for _ in range(3)])
    long_len = min(LONG_TOKENS, max(room - 32, 0))
    if long_len > chunk_tokens:  # only worth it when the prompt takes several chunks
        long_prompt = tokens(long_len)
        waves.append([WarmupRequest(long_prompt, _greedy(2))])
        waves.append([WarmupRequest(long_prompt + tokens(9), _greedy(4))])
    return [w for w in waves if w]


def _warm_bitmask(vocab_size: int, device: torch.device) -> None:
    """The grammar bitmask kernel, as the sampler launches it (fp32 logits [B, V], int32 words):
    compiled here, not on the first constrained request (it needs no grammar to run)."""
    from radixrt.kernels.token_bitmask import apply_token_bitmask

    logits = torch.zeros(2, vocab_size, dtype=torch.float32, device=device)
    words = torch.full((2, -(-vocab_size // 32)), -1, dtype=torch.int32, device=device)
    apply_token_bitmask(logits, words)


def warm_up(core: EngineCore) -> dict[str, Any]:
    """Run the waves to completion, flush the prefix cache; what compiled, and how long it took."""
    assert not core.has_work(), "warm-up runs on an idle engine only"
    cfg = core.config
    pool_tokens = core.stats().total_pages * cfg.page_size
    waves = plan_waves(core.model_info.vocab_size, core.model_info.max_context_len, pool_tokens,
                       cfg.chunked_prefill_size, cfg.seed)
    t0 = time.perf_counter()
    with CompileLog() as log:
        for w, wave in enumerate(waves):
            for i, req in enumerate(wave):
                core.add_request(f"__warmup-{w}-{i}", req.prompt, req.params)
            while core.has_work():
                core.step()
        if torch.device(cfg.device).type == "cuda":
            _warm_bitmask(core.model_info.vocab_size, torch.device(cfg.device))
    core.flush_cache()
    compiles = log.summary()
    report = {"seconds": round(time.perf_counter() - t0, 3), "waves": len(waves),
              "requests": sum(len(w) for w in waves), "compiles": compiles}
    logger.info("warm-up: %d requests in %.1fs, %d kernel compiles (%.1fs)", report["requests"],
                report["seconds"], compiles["count"], compiles["seconds"])
    return report


def freeze_startup_objects() -> int:
    """Collect once, then move every object alive now (modules, weight wrappers, the tokenizer,
    the warm-up's leftovers) out of the cyclic collector's generations, so the full collections
    that serving triggers now and then scan only what serving allocated. Process-wide: the
    worker processes call it once the engine is up (an in-process ``Engine`` leaves the host
    program's collector alone). Unfrozen, one full collection took ~70 ms on the CPU box (a
    tiny model with 256 x 1k requests running: 170k objects; 0 ms frozen), and on the H200 the
    256 x 1k decode step showed 0.25-4.8 ms/step of host idle from run to run (RESULTS.md,
    session 7). Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
