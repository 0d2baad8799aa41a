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
