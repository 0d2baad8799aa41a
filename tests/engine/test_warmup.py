"""The start-up warm-up (engine/warmup.py): it runs the step kinds real traffic needs, leaves the
engine idle with every page free, never changes an answer; and the compile log it reports
through records Triton compiles and hands Triton's hooks back."""

from __future__ import annotations

from typing import Any

import pytest

from radixrt import Engine, SamplingParams
from radixrt.config import EngineConfig
from radixrt.engine.warmup import plan_waves
from radixrt.kernels.compile_log import CompileLog

PARAMS = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


def test_warmup_leaves_the_engine_idle_and_answers_unchanged(tiny_model_dir: Any) -> None:
    model = str(tiny_model_dir("llama"))
    prompts = [[5 + (i * 31 + j * 7) % 200 for j in range(40 + 9 * i)] for i in range(4)]
    cold = Engine(model, page_size=16, kv_cache_tokens=4096)
    assert cold.core.warmup_report is None, "CPU default: no warm-up"
    warm = Engine(model, page_size=16, kv_cache_tokens=4096, warmup=True, debug_invariants=True)
    report = warm.core.warmup_report
    assert report is not None and report["requests"] >= 10 and report["waves"] >= 3
    st = warm.stats()
    assert not warm.core.has_work() and st.running_requests == 0
    assert st.free_pages == st.total_pages, "the warm-up's pages all went back (cache flushed)"
    raw = warm.core.scheduler.stats()
    assert raw.generated_tokens_total > 0, "the warm-up decoded through the real scheduler"
    # ... but the engine's counters start after it: a user sees only their own traffic.
    assert (st.prompt_tokens_total, st.generated_tokens_total, st.query_tokens, st.hit_tokens,
            st.evictions, st.retractions) == (0, 0, 0, 0, 0, 0)
    assert st.extra["overlapped_steps"] == 0.0 and st.extra["forward_steps_eager"] == 0.0
    warm.core.check_invariants()
    want = [o.token_ids for o in cold.generate(prompts, PARAMS)]
    assert [o.token_ids for o in warm.generate(prompts, PARAMS)] == want
    after = warm.stats()
    assert after.prompt_tokens_total == sum(len(p) for p in prompts)
    assert after.generated_tokens_total == len(prompts) * PARAMS.max_new_tokens
    assert after.hit_tokens == cold.stats().hit_tokens, "the same hits as an engine never warmed"
    # CPU: every step eager, no graphs; the warm-up's steps are not in the count.
    assert after.extra["forward_steps_eager"] == cold.stats().extra["forward_steps_eager"] > 0
    assert after.extra["forward_steps_decode_graph"] == after.extra["forward_steps_piecewise_graph"] == 0


def test_warmup_flag_defaults_on_for_cuda_only() -> None:
    assert EngineConfig(device="cuda").warmup_enabled
    assert not EngineConfig(device="cpu").warmup_enabled
    assert not EngineConfig(device="cuda", warmup=False).warmup_enabled


@pytest.mark.parametrize("context,pool", [(64, 4096), (4096, 1 << 20), (40000, 1 << 20)])
def test_waves_fit_the_context_and_cover_hits_groups_and_long_prompts(context: int,
                                                                     pool: int) -> None:
    waves = plan_waves(1000, context, pool, chunk_tokens=2048)
    for wave in waves:
        for r in wave:
            assert len(r.prompt) + r.params.max_new_tokens <= context, "must fit the context"
            assert all(3 <= t < 1000 for t in r.prompt)
    cold = [r.prompt for r in waves[0]]
    # Wave 2 extends cached prompts: each starts with one of wave 1's.
    assert waves[1] and all(any(r.prompt[:len(p)] == p and len(r.prompt) > len(p) for p in cold)
                            for r in waves[1])
    if context >= 400:
        group = waves[2]
        assert len(group) == 3 and len({tuple(r.prompt) for r in group}) == 3
        assert all(r.prompt[:300] == cold[-1] for r in group), "one shared cached prefix"
    if context - 48 > 2048:  # room for a prompt of several chunks
        long_prompt = waves[3][0].prompt
        assert 2048 < len(long_prompt) <= 8192
        assert waves[4][0].prompt[:len(long_prompt)] == long_prompt
    else:
        assert all(len(r.prompt) <= 400 for w in waves for r in w)


def test_compile_log_records_and_chains_triton_hooks() -> None:
    knobs = pytest.importorskip("triton").knobs
    rt = knobs.runtime
    seen: list[str] = []
    prev_cache = lambda **kw: seen.append("cache") or None  # noqa: E731
    prev_post = lambda **kw: seen.append("post")  # noqa: E731
    saved = (rt.jit_cache_hook, rt.jit_post_compile_hook)
    rt.jit_cache_hook, rt.jit_post_compile_hook = prev_cache, prev_post
    try:
        fn = type("Info", (), {"name": "_my_kernel"})()
        with CompileLog() as log:
            assert log.active
            # What Triton calls around one compile (runtime/jit.py _do_compile).
            assert not rt.jit_cache_hook(key="k1", repr="_my_kernel[...]", fn=fn, compile={},
                                         is_manual_warmup=False, already_compiled=False)
            rt.jit_post_compile_hook(key="k1", repr="_my_kernel[...]", fn=fn, compile={},
                                     is_manual_warmup=False, already_compiled=False)
        assert seen == ["cache", "post"], "the hooks installed before still ran"
        assert (rt.jit_cache_hook, rt.jit_post_compile_hook) == (prev_cache, prev_post)
        summary = log.summary()
        assert summary["count"] == 1 and list(summary["kernels"]) == ["_my_kernel"]
        assert log.events[0].seconds >= 0.0
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = saved
