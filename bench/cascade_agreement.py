"""Greedy agreement of cascade on vs off where it means something.

Random N(0, 0.02) weights put the top-2 logits of most steps within a few hundredths of each
other, so bf16 rounding alone (a different summation order in attention) flips some argmaxes,
and one flip changes everything after it: "identical outputs" measures the weights, not the
kernels. So each variant runs the same small gsp batch (same order, same engine, greedy) with
top-2 logprobs, and per request the first step where the tokens differ is classified by the
cascade-off run's top-1 / top-2 margin there:

    margin < tie bound   a near-tie: rounding may flip it, both tokens are right
    margin >= tie bound  a real disagreement (a bug, or a bound set too tight)

The bound is checked against the noise actually seen: |logprob on - logprob off| of the chosen
token at the steps before any divergence (same history, so only rounding differs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from radixrt.engine.core import EngineCore
from radixrt.sampling_params import SamplingParams

TIE_BOUND = 0.05  # nats; bench_engine.py's cache-agreement check uses the same


def collect(core: EngineCore, vocab: int, *, groups: int = 8, per_group: int = 16,
            tokens: int = 64, len_scale: float = 1.0) -> dict[str, Any]:
    """Greedy tokens + per-step top-2 logprobs of a gsp batch (2,048-token system prompts,
    128-token questions, times ``len_scale``)."""
    from bench.workloads import gsp

    work = gsp(vocab, seed=1, num_groups=groups, prompts_per_group=per_group,
               system_len=max(1, int(2048 * len_scale)), question_len=max(1, int(128 * len_scale)),
               output_len=tokens)
    params = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True,
                            logprobs=True, top_logprobs=2)
    core.flush_cache()
    out: dict[str, dict[str, list[Any]]] = {}
    for i, conv in enumerate(work.conversations):
        rid = f"agree-{i}"
        core.add_request(rid, list(conv.turns[0].input_ids), params)
        out[rid] = {"ids": [], "lp": [], "top": []}
    while core.has_work():
        for d in core.step():
            rec = out[d.rid]
            rec["ids"] += d.new_token_ids
            rec["lp"] += d.new_logprobs or []
            rec["top"] += [[[int(t), float(p)] for t, p in row] for row in d.new_top_logprobs or []]
    core.flush_cache()
    return out


def _margin(top: list[list[float]]) -> float:
    return float(top[0][1] - top[1][1]) if len(top) >= 2 else float("inf")


def summarize(on: dict[str, Any], off: dict[str, Any], bound: float = TIE_BOUND) -> dict[str, Any]:
    """Divergences classified by the off run's margin (see the module docstring)."""
    diverged, at_tie, margins, noise = 0, 0, [], []
    confident_steps = confident_agree = 0
    for rid, a in on.items():
        b = off[rid]
        n = min(len(a["ids"]), len(b["ids"]))
        d = next((i for i in range(n) if a["ids"][i] != b["ids"][i]), None)
        upto = n if d is None else d
        noise += [abs(x - y) for x, y in zip(a["lp"][:upto], b["lp"][:upto])]
        # Steps with the same history: top-1 agreement where the off run's margin is real.
        for i in range(min(n, upto + 1)):
            if _margin(b["top"][i]) >= bound:
                confident_steps += 1
                confident_agree += a["ids"][i] == b["ids"][i]
        if d is not None:
            diverged += 1
            m = _margin(b["top"][d])
            margins.append(m)
            at_tie += m < bound
    noise_arr = np.asarray(noise) if noise else np.zeros(1)
    return {
        "requests": len(on), "identical": len(on) - diverged, "diverged": diverged,
        "diverged_at_near_tie": at_tie, "tie_bound_nats": bound,
        "margins_at_divergence": sorted(margins),
        "noise_logprob_abs_p50": float(np.median(noise_arr)),
        "noise_logprob_abs_p99": float(np.quantile(noise_arr, 0.99)),
        "noise_logprob_abs_max": float(noise_arr.max()),
        "confident_steps": confident_steps,
        "confident_top1_agreement": confident_agree / max(1, confident_steps),
    }


def summary_lines(s: dict[str, Any]) -> list[str]:
    worst = max(s["margins_at_divergence"], default=0.0)
    return [
        f"- greedy agreement ({s['requests']} gsp requests, top-2 logprobs): "
        f"{s['identical']} identical; first divergence happened at a near-tie (off run's top-1 "
        f"/ top-2 margin < {s['tie_bound_nats']} nats) in {s['diverged_at_near_tie']} of "
        f"{s['diverged']} diverging requests (largest margin at a divergence {worst:.4f})",
        f"- top-1 agreement at steps with margin >= {s['tie_bound_nats']} (same history): "
        f"{s['confident_top1_agreement']:.4f} of {s['confident_steps']}; rounding noise "
        f"|logprob on - off| before divergence p50 {s['noise_logprob_abs_p50']:.2e}, p99 "
        f"{s['noise_logprob_abs_p99']:.2e}, max {s['noise_logprob_abs_max']:.2e}",
    ]
