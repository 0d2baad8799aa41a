"""Piecewise CUDA graphs for prefill and mixed steps (engine/piecewise_graph.py): the captured
sizes, the config's bounds, and on a GPU that replaying them never changes an answer."""

from __future__ import annotations

import pytest
import torch

from radixrt import Engine, SamplingParams
from radixrt.config import EngineConfig
from radixrt.engine.piecewise_graph import fused_qkv_view, piecewise_sizes
from tests.engine.test_engine import shared_prompt_batch


@pytest.mark.parametrize("max_tokens", [1, 31, 32, 100, 256, 257, 1000, 2048, 4097])
def test_sizes_cover_every_step_with_bounded_padding(max_tokens):
    sizes = piecewise_sizes(max_tokens)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_tokens
    for tokens in range(1, max_tokens + 1):
        padded = next(s for s in sizes if s >= tokens)
        assert padded - tokens < 16, (tokens, padded)  # padding rows cost real GEMM work


def test_fused_qkv_view_only_for_adjacent_blocks():
    """The capture copies q/k/v in one piece only when they are the fused projection's column
    blocks in order; anything else (a transform that made new tensors) takes three copies."""
    t, hq, hkv, d = 5, 4, 2, 8
    qkv = torch.randn(t, (hq + 2 * hkv) * d)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
    fused = fused_qkv_view(q, k, v)
    assert fused is not None and fused.data_ptr() == qkv.data_ptr()
    assert torch.equal(fused, torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1))
    assert fused_qkv_view(q.contiguous(), k, v) is None  # q no longer in the block
    assert fused_qkv_view(q, v, k) is None  # out of order
    assert fused_qkv_view(q[1:], k[1:], v[1:]) is not None  # row slices keep the layout
    assert fused_qkv_view(q[:, :, :4], k[:, :, :4], v[:, :, :4]) is None


@pytest.mark.parametrize("bad", [-1, 16385, 2**70, 1.5, "2048", True])
def test_config_rejects_bad_max_tokens(bad):
    with pytest.raises(ValueError, match="piecewise_cuda_graph_max_tokens"):
        EngineConfig(piecewise_cuda_graph_max_tokens=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_piecewise_replay_equals_eager(tiny_model_dir, variant):
    """fp32: the same greedy tokens and logprobs (to fp32 rounding) with the prefill and mixed
    steps replayed as piecewise graphs as when they run eagerly, across prefix hits, chunked
    prefill, and steps both under and over the largest captured size."""
    prompts = shared_prompt_batch(5, n=12)
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True, logprobs=True)

    def run(max_tokens: int) -> tuple[list, Engine]:
        eng = Engine(str(tiny_model_dir(variant)), device="cuda", dtype="float32", page_size=16,
                     kv_cache_tokens=8192, max_running_requests=32, chunked_prefill_size=48,
                     max_prefill_tokens=96, piecewise_cuda_graph_max_tokens=max_tokens,
                     warmup=False, debug_invariants=True)
        eng.generate(prompts[:3], params)  # later prompts hit the cached stem
        return eng.generate(prompts, params), eng

    eager, eager_eng = run(0)
    graphed, eng = run(64)  # steps above 64 tokens stay eager
    assert eager_eng.core.runner.piecewise is None
    piecewise = eng.core.runner.piecewise
    assert piecewise is not None and piecewise.replayed_steps > 0, "no step replayed"
    assert eng.stats().extra["forward_steps_piecewise_graph"] == piecewise.replayed_steps
    assert sum(o.cached_tokens for o in graphed) > 0, "the cache was never hit"
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    for a, b in zip(graphed, eager):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    st = eng.stats()
    assert st.free_pages + st.evictable_pages == st.total_pages
