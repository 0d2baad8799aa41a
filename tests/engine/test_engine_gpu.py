"""The engine on a CUDA GPU (Triton attention, CUDA-graph decode) gives the CPU reference's
greedy tokens on the tiny models, with the cache on and off and under retraction."""

from __future__ import annotations

import pytest

from radixrt import Engine, SamplingParams
from tests.engine.test_engine import shared_prompt_batch

pytestmark = pytest.mark.gpu

PARAMS = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def cpu_refs(tiny_model_dir):
    prompts = shared_prompt_batch(21, n=12)
    out = {}
    for variant in ("llama", "qwen2", "qwen3"):
        eng = Engine(str(tiny_model_dir(variant)), page_size=16, kv_cache_tokens=4096)
        out[variant] = [o.token_ids for o in eng.generate(prompts, PARAMS)]
    return prompts, out


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("cache,graphs,kv_tokens", [(True, True, 8192), (False, False, 8192), (True, True, 320)])
def test_cuda_greedy_equals_cpu(tiny_model_dir, cpu_refs, variant, cache, graphs, kv_tokens):
    prompts, refs = cpu_refs
    eng = Engine(str(tiny_model_dir(variant)), device="cuda", dtype="float32", page_size=16,
                 kv_cache_tokens=kv_tokens, enable_prefix_cache=cache, disable_cuda_graph=not graphs,
                 max_running_requests=32, debug_invariants=True)
    outs = eng.generate(prompts, PARAMS)
    assert [o.token_ids for o in outs] == refs[variant]
    again = eng.generate(prompts, PARAMS)
    assert [o.token_ids for o in again] == refs[variant]
    st = eng.stats()
    assert st.free_pages + st.evictable_pages == st.total_pages
    if kv_tokens < 1000:
        assert st.retractions > 0


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_deterministic_inference_never_changes_an_answer(tiny_model_dir, variant):
    """bf16 with deterministic inference: prefix cache on or off, a prompt alone or in a batch,
    chunked or whole prefill, CUDA graphs or eager -> the same tokens and bitwise-equal
    logprobs, greedy and seeded sampling alike."""
    prompts = shared_prompt_batch(33, n=12)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True, logprobs=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_new_tokens=24,
                            ignore_eos=True, logprobs=True)

    def engine(**kw):
        return Engine(str(tiny_model_dir(variant)), device="cuda", dtype="bfloat16", page_size=16,
                      kv_cache_tokens=8192, max_running_requests=32, deterministic_inference=True,
                      debug_invariants=True, **kw)

    def answers(outs):
        return [(o.token_ids, o.logprobs) for o in outs]

    for params in (greedy, seeded):
        reference = answers(engine(enable_prefix_cache=False).generate(prompts, params))
        cached = engine()
        cached.generate(prompts[:4], params)  # warm the tree: later prompts hit the stem
        outs = cached.generate(prompts, params)
        assert sum(o.cached_tokens for o in outs) > 0, "the cache was never hit"
        assert answers(outs) == reference, "prefix cache changed an answer"
        eager_chunked = engine(disable_cuda_graph=True, chunked_prefill_size=16, max_prefill_tokens=32)
        assert answers(eager_chunked.generate(prompts, params)) == reference, "chunking / eager"
        alone = [answers(cached.generate([p], params))[0] for p in prompts[:3]]
        assert alone == reference[:3], "batch composition changed an answer"
