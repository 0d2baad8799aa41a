"""Benchmark suite: workloads, metric definitions, optimal hit rate, hardware-floor arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import floor as fl
from bench.metrics import (
    RequestRecord,
    compute_metrics,
    hit_rate,
    optimal_hit_rate,
    optimal_hits,
    records_stream,
    ttft_by_turn,
)
from bench.workloads import WORKLOADS, expected_stream, make_workload
from radixrt.models.presets import preset_config

VOCAB = 1000


# ---------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("name", WORKLOADS)
def test_workloads_are_deterministic_and_in_vocab(name: str) -> None:
    a = make_workload(name, VOCAB, seed=1, scale=0.05, len_scale=0.1)
    b = make_workload(name, VOCAB, seed=1, scale=0.05, len_scale=0.1)
    c = make_workload(name, VOCAB, seed=2, scale=0.05, len_scale=0.1)
    assert a == b, "same seed must give the same workload"
    assert a != c, "another seed must give another workload"
    toks = [t for conv in a.conversations for turn in conv.turns for t in turn.input_ids]
    assert min(toks) >= 3 and max(toks) < int(VOCAB * 0.9), "ids stay clear of special tokens"


def test_gsp_shape_and_sharing() -> None:
    w = make_workload("gsp", VOCAB, num_groups=4, prompts_per_group=3, system_len=40,
                      question_len=8, output_len=5)
    assert w.num_requests == 12
    prompts = [c.turns[0].input_ids for c in w.conversations]
    assert all(len(p) == 48 for p in prompts)
    assert {t.max_new_tokens for c in w.conversations for t in c.turns} == {5}
    systems = [p[:40] for p in prompts]
    assert len(set(systems)) == 4 and all(systems.count(s) == 3 for s in systems)
    assert len(set(prompts)) == 12, "questions differ within a group"
    assert systems[:3] != [systems[0]] * 3, "groups are shuffled, not contiguous"


def test_chat_history_grows_with_outputs() -> None:
    w = make_workload("chat", VOCAB, num_conversations=2, num_turns=3, input_range=(10, 20))
    assert w.multi_turn and w.num_requests == 6
    stream = expected_stream(w)
    # turn-major: conv0 t0, conv1 t0, conv0 t1, ...
    (p00, o00), (p01, _) = stream[0], stream[2]
    assert p01[: len(p00)] == p00, "turn 2 resends turn 1's prompt"
    assert len(p01) == len(p00) + o00 + len(w.conversations[0].turns[1].input_ids)
    assert all(4 <= t.max_new_tokens <= 8 for c in w.conversations for t in c.turns), "short outputs"
    long = make_workload("chat", VOCAB, num_conversations=1, output="long")
    assert all(256 <= t.max_new_tokens <= 512 for t in long.conversations[0].turns)


def test_rag_documents_follow_zipf() -> None:
    w = make_workload("rag", VOCAB, num_docs=8, doc_len=32, num_questions=400, instruction_len=4,
                      question_len=4, output_len=2)
    docs = [c.turns[0].input_ids[4:36] for c in w.conversations]
    counts = sorted((docs.count(d) for d in set(docs)), reverse=True)
    assert len(counts) <= 8 and counts[0] > 3 * counts[-1], "a few documents dominate"
    assert len({c.turns[0].input_ids[:4] for c in w.conversations}) == 1, "one instruction"


def test_fewshot_and_random_shapes() -> None:
    f = make_workload("fewshot", VOCAB, num_questions=10, shot_len=20)
    assert len({c.turns[0].input_ids[:100] for c in f.conversations}) == 1, "5 x 20 header shared"
    r = make_workload("random", VOCAB)
    assert r.num_requests == 256
    for c in r.conversations:
        assert 100 <= len(c.turns[0].input_ids) <= 1024 and 100 <= c.turns[0].max_new_tokens <= 1024


def test_scale_knobs() -> None:
    full = make_workload("gsp", VOCAB)
    small = make_workload("gsp", VOCAB, scale=0.25, len_scale=0.5)
    assert full.num_requests == 64 * 16 and small.num_requests == 16 * 16
    assert len(small.conversations[0].turns[0].input_ids) == 1024 + 64
    assert small.conversations[0].turns[0].max_new_tokens == 128


# ---------------------------------------------------------------------------- optimal hit rate


def test_optimal_hits_last_token_rule_and_order() -> None:
    a = list(range(10, 19))  # 9 tokens
    # page 4: a first request hits nothing; the same 9-token prompt again hits 2 pages (8); an
    # 8-token prompt hits only 1 page: its last token sits in page 2 and must be recomputed.
    stream = [(a, a), (a, a), (a[:8], a[:8])]
    assert optimal_hits(stream, 4) == [0, 8, 4]
    # Order matters: a request only hits what came before it.
    assert optimal_hits([(a[:5], a[:5]), (a, a)], 4) == [0, 4]
    assert optimal_hits([(a, a), (a[:5], a[:5])], 4) == [0, 4]
    # Partial pages are never cached.
    assert optimal_hits([(a[:3], a[:3]), (a, a)], 4) == [0, 0]


def test_optimal_hits_reuse_only_computed_output() -> None:
    prompt = list(range(100, 108))  # 8 tokens
    out = [200, 201, 202, 203, 204]
    r1 = RequestRecord("r1", 0, 0, prompt, 5, 0.0, output_ids=out, chunk_times=[1.0] * 5,
                       finish_reason="length")
    # The last sampled token (204) never got KV: 8 + 4 = 12 computed tokens, 3 pages of 4.
    assert r1.computed_tokens == prompt + out[:4]
    p2 = prompt + out + [300, 301, 302, 303]  # 17 tokens: page 4 is [204 300 301 302]
    r2 = RequestRecord("r2", 0, 1, p2, 1, 2.0, output_ids=[5], chunk_times=[3.0],
                       finish_reason="length")
    assert optimal_hits(records_stream([r2, r1]), 4) == [0, 12]
    stopped = RequestRecord("r3", 0, 0, prompt, 5, 0.0, output_ids=out, finish_reason="stop")
    assert stopped.computed_tokens == prompt + out, "a stop token means the last output was fed"
    assert optimal_hit_rate(records_stream([r1, r2]), 4) == pytest.approx(12 / 25)


def test_expected_stream_optimal_for_gsp_matches_closed_form() -> None:
    w = make_workload("gsp", VOCAB, num_groups=3, prompts_per_group=4, system_len=64,
                      question_len=16, output_len=4)
    stream = [(p, p + [-1] * (o - 1)) for p, o in expected_stream(w)]
    # Each group's first prompt misses; the other 3 hit the 64-token system prompt (4 pages).
    assert optimal_hit_rate(stream, 16) == pytest.approx(3 * 3 * 64 / (12 * 80))


# ---------------------------------------------------------------------------- metrics


def test_metric_definitions() -> None:
    r1 = RequestRecord("a", 0, 0, [1] * 10, 3, 0.0, output_ids=[7, 8, 9],
                       chunk_times=[1.0, 1.5, 2.5], cached_tokens=4, finish_reason="length")
    r2 = RequestRecord("b", 1, 0, [1] * 30, 1, 0.5, output_ids=[7], chunk_times=[2.0],
                       cached_tokens=0, finish_reason="length")
    bad = RequestRecord("c", 2, 0, [1] * 5, 2, 0.0, error="boom")
    m = compute_metrics([r1, r2, bad], duration_s=4.0)
    assert (m.completed, m.failed) == (2, 1)
    assert m.ttft_s.mean == pytest.approx((1.0 + 1.5) / 2)
    assert m.tpot_s.mean == pytest.approx(0.75), "TPOT only over requests with > 1 token"
    assert m.itl_s.mean == pytest.approx(0.75) and m.itl_s.p50 == pytest.approx(0.75)
    assert m.e2e_s.mean == pytest.approx((2.5 + 1.5) / 2)
    assert m.output_throughput == pytest.approx(4 / 4.0)
    assert m.input_throughput == pytest.approx(40 / 4.0)
    assert m.request_throughput == pytest.approx(0.5)
    assert m.hit_rate == pytest.approx(4 / 40) == hit_rate([r1, r2])
    assert compute_metrics([r1, r2]).duration_s == pytest.approx(2.5), "first arrival to last token"
    r3 = RequestRecord("d", 0, 1, [1] * 12, 1, 3.0, output_ids=[1], chunk_times=[3.2],
                       finish_reason="length")
    assert ttft_by_turn([r1, r3]) == {1: pytest.approx(1.0), 2: pytest.approx(0.2)}


# ---------------------------------------------------------------------------- floor


def test_model_shape_llama3_8b() -> None:
    s = fl.ModelShape.from_hf_config(preset_config("llama3-8b"), dtype_bytes=2)
    # 8.03B parameters = linear layers + embedding + lm_head (norms are negligible).
    total = s.linear_params + 2 * s.hidden_size * s.vocab_size
    assert total == pytest.approx(8.03e9, rel=0.002)
    assert s.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB per token
    assert s.weight_bytes == pytest.approx((s.linear_params + 4096 * 128256) * 2)


def test_floor_arithmetic_by_hand() -> None:
    s = fl.ModelShape(num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2,
                      num_kv_heads=1, head_dim=4, vocab_size=10, tie_word_embeddings=False,
                      dtype_bytes=2)
    assert s.layer_params == 8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16
    lin = 2 * s.layer_params
    # 3 new tokens after 2 cached: query positions 2,3,4 see 3+4+5 = 12 keys = n*c + n(n+1)/2.
    want = 2 * lin * 3 + 4 * 2 * 4 * 2 * 12 + 2 * 8 * 10
    assert s.prefill_flops(2, 3) == pytest.approx(want)
    hw = fl.Hardware("test", matmul_flops=1e6, copy_bandwidth=1e6)
    req = [fl.RequestShape(5, 0, 3), fl.RequestShape(5, 0, 3)]
    f = fl.floor_time(s, hw, req, batch=2)
    assert f.decode_steps == 2, "2 decode tokens each, decoded together"
    # Decode token k reads the KV of prompt + k tokens: (5+1) + (5+2) per request.
    kv = 2 * (6 + 7) * s.kv_bytes_per_token
    assert f.decode_bytes == pytest.approx(2 * s.weight_bytes + kv)
    assert f.prefill_s == pytest.approx(2 * s.prefill_flops(0, 5) / 1e6)
    assert f.total_s == pytest.approx(f.prefill_s + f.decode_s)
    assert fl.floor_time(s, hw, req, batch=1).decode_steps == 4


def test_compute_aware_floor_by_hand() -> None:
    """Per operation max(compute, memory): projections per step, attention over the KV."""
    s = fl.ModelShape(num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2,
                      num_kv_heads=1, head_dim=4, vocab_size=10, tie_word_embeddings=False,
                      dtype_bytes=2)
    # A slow matmul makes the projections compute-bound: 4 tokens a step x token FLOPs.
    hw = fl.Hardware("test", matmul_flops=1e3, copy_bandwidth=1e6)
    req = [fl.RequestShape(5, 0, 3)] * 4  # 2 decode tokens each, one step of 4 tokens
    f = fl.floor_time(s, hw, req, batch=4)
    tok = s.decode_token_flops(0)
    ctx = 2 * 5 + 3  # token k of 1..2 reads prompt + k keys
    kv = 4 * ctx * s.kv_bytes_per_token
    attn = 4 * 4.0 * s.num_heads * s.head_dim * s.num_layers * ctx
    assert f.decode_steps == 2
    linear = 2 * max(4 * tok / 1e3, s.weight_bytes / 1e6)
    assert f.decode_s == pytest.approx(linear + max(kv / 1e6, attn / 1e3))
    # The bandwidth floor is the original max over totals, never above the compute-aware one.
    flops = 8 * tok + attn
    assert f.bandwidth_decode_s == pytest.approx(max((2 * s.weight_bytes + kv) / 1e6, flops / 1e3))
    assert f.bandwidth_decode_s <= f.decode_s
    assert f.to_dict()["bandwidth_total_s"] == pytest.approx(f.prefill_s + f.bandwidth_decode_s)


def test_compute_aware_floor_counts_sequential_steps() -> None:
    """One long request cannot decode faster than one token a step, however large the batch."""
    s = fl.ModelShape.from_hf_config(preset_config("llama3-8b"))
    hw = fl.Hardware("h200ish", matmul_flops=7.9e14, copy_bandwidth=4.3e12)
    reqs = [fl.RequestShape(100, 0, 2)] * 63 + [fl.RequestShape(100, 0, 101)]
    f = fl.floor_time(s, hw, reqs, batch=256)
    assert f.decode_steps == 100  # ceil(163 / 256) = 1 step by tokens alone
    assert f.decode_s > 100 * s.weight_bytes / hw.copy_bandwidth
    assert f.bandwidth_decode_s < 2 * s.weight_bytes / hw.copy_bandwidth + 1e-3


def test_compute_aware_floor_batch_256_projections_compute_bound() -> None:
    """The issue's case: batch 256 x 1k decode of an 8B model; its projections take ~4.9 ms at
    790 TFLOP/s, more than the ~3.7 ms to read the weights, so the floor rises above bandwidth."""
    s = fl.ModelShape.from_hf_config(preset_config("llama3-8b"))
    hw = fl.Hardware("h200ish", matmul_flops=7.9e14, copy_bandwidth=4.3e12)
    f = fl.floor_time(s, hw, [fl.RequestShape(1024, 0, 2)] * 256, batch=256)
    proj = 256 * s.decode_token_flops(0) / hw.matmul_flops
    assert proj == pytest.approx(4.9e-3, rel=0.03)
    assert proj > s.weight_bytes / hw.copy_bandwidth
    kv = 256 * 1025 * s.kv_bytes_per_token / hw.copy_bandwidth
    assert f.decode_s == pytest.approx(proj + kv)
    assert f.decode_s > f.bandwidth_decode_s


def test_chunked_prefill_floor_by_hand() -> None:
    s = fl.ModelShape(num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2,
                      num_kv_heads=1, head_dim=4, vocab_size=10, tie_word_embeddings=False,
                      dtype_bytes=2)
    hw = fl.Hardware("test", matmul_flops=1e4, copy_bandwidth=1e5)
    got = fl.chunked_prefill_floor(s, hw, prompt_len=5, chunk=3)  # chunks of 3 and 2 tokens
    lin_b = s.linear_params * 2 / 1e5
    want = (max(2 * s.linear_params * 3 / 1e4, lin_b) + max(s.attention_flops(0, 3) / 1e4,
                                                           3 * s.kv_bytes_per_token / 1e5)
            + max(2 * s.linear_params * 2 / 1e4, lin_b) + max(s.attention_flops(3, 2) / 1e4,
                                                             5 * s.kv_bytes_per_token / 1e5)
            + max(2 * 8 * 10 / 1e4, 8 * 10 * 2 / 1e5))
    assert got["floor_s"] == pytest.approx(want)
    assert got["flops_s"] == pytest.approx(s.prefill_flops(0, 5) / 1e4)
    assert s.attention_flops(0, 5) == s.attention_flops(0, 3) + s.attention_flops(3, 2)


def test_ideal_speedup_only_shrinks_prefill() -> None:
    s = fl.ModelShape.from_hf_config(preset_config("llama3-8b"))
    hw = fl.Hardware("h100ish", matmul_flops=7e14, copy_bandwidth=3e12)
    shapes = [(2176, 256)] * 64
    cached = [0] + [2048] * 63
    res = fl.workload_floors(s, hw, shapes, cached, batch=64)
    assert res["cache_off"]["decode_s"] == pytest.approx(res["optimal"]["decode_s"])
    assert res["optimal"]["prefill_s"] < res["cache_off"]["prefill_s"] / 10
    assert 1.0 < res["ideal_speedup"] < 10.0
    assert fl.decode_batch([fl.RequestShape(100, 0, 100)] * 50, max_running=256, streams=50,
                           kv_tokens=1000) == 5, "KV capacity caps the decode batch"


# ---------------------------------------------------------------------------- end to end


def test_run_bench_offline_end_to_end(tmp_path: Path) -> None:
    from bench.run_bench import main

    out = tmp_path / "res"
    rc = main(["--workload", "gsp,chat", "--model", "llama-tiny", "--load-format", "dummy",
               "--compare-cache", "--scale", "0.03", "--len-scale", "0.05", "--out", str(out),
               "--no-progress", "--kv-cache-tokens", "8192", "--hw-matmul-n", "128",
               "--hw-copy-mib", "8"])
    assert rc == 0
    gsp_on = json.loads((out / "gsp_radix.json").read_text())
    gsp_off = json.loads((out / "gsp_nocache.json").read_text())
    assert gsp_on["metrics"]["completed"] == gsp_on["num_requests"] > 0
    assert gsp_on["metrics"]["hit_rate"] == pytest.approx(gsp_on["optimal_hit_rate"], abs=0.01)
    assert gsp_on["metrics"]["hit_rate"] > 0.5 and gsp_off["metrics"]["hit_rate"] == 0.0
    assert gsp_on["floor"]["ideal_speedup"] > 1.0
    chat_on = json.loads((out / "chat_radix.json").read_text())
    assert set(chat_on["ttft_by_turn"]) == {str(t) for t in range(1, 9)}
    for f in ("summary.md", "summary.json", "throughput_ttft.png", "hit_rate.png",
              "chat_ttft_by_turn.png"):
        assert (out / f).stat().st_size > 0, f
    assert "| gsp | radix |" in (out / "summary.md").read_text()


def test_profile_top_kernels_sum_names_alike_up_to_the_cut() -> None:
    """Templated kernel names share long prefixes: cut to the width, their times add up."""
    from bench.kernel_groups import top_kernels

    long = "void cublasLt::splitKreduce_kernel<32, 16, int, float, " * 4
    kernels = {long + "A>": 1.25, long + "B>": 2.0, "_rope_kernel": 0.5, "_silu": 0.1}
    top = top_kernels(kernels, 2)
    assert top == {long[:140]: 3.25, "_rope_kernel": 0.5}
