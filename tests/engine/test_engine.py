"""The in-process engine on tiny random models: greedy output equals transformers.generate with the
prefix cache on or off, under eviction and retraction, and the cache reports what it saved."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from radixrt import Engine, SamplingParams
from radixrt.config import EngineConfig
from tests.fixtures.tiny_models import load_hf_model

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def shared_prompt_batch(seed: int, vocab: int = 500, n: int = 8, stem: int = 45) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(3, vocab) for _ in range(stem)]
    return [system + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def hf_llama(llama_dir):
    return load_hf_model(llama_dir)


@pytest.fixture(scope="module")
def prompts_and_refs(hf_llama):
    prompts = shared_prompt_batch(0)
    return prompts, [hf_greedy(hf_llama, p, GREEDY.max_new_tokens) for p in prompts]


@pytest.mark.parametrize(
    "page_size,kv_tokens,cache,policy,overlap",
    [
        (16, 4096, True, "lpm", False),
        (1, 4096, True, "fcfs", False),
        (16, 4096, False, "lpm", False),
        (4, 4096, True, "fcfs", True),
    ],
)
def test_greedy_matches_transformers(
    llama_dir, prompts_and_refs, page_size, kv_tokens, cache, policy, overlap
):
    prompts, refs = prompts_and_refs
    eng = Engine(str(llama_dir), page_size=page_size, kv_cache_tokens=kv_tokens,
                 enable_prefix_cache=cache, schedule_policy=policy, debug_invariants=True,
                 overlap_schedule=overlap)
    outs = eng.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == refs
    # Same requests again: identical answers, now served mostly from the cache.
    again = eng.generate(prompts, GREEDY)
    assert [o.token_ids for o in again] == refs
    if cache:
        for p, o in zip(prompts, again):
            assert o.cached_tokens == (len(p) - 1) // page_size * page_size
    else:
        assert all(o.cached_tokens == 0 for o in again)
    _assert_idle_clean(eng)


@pytest.mark.parametrize("page_size,kv_tokens,overlap", [(1, 150, False), (16, 192, True)])
def test_tiny_pool_evicts_and_retracts_without_changing_answers(
    llama_dir, prompts_and_refs, page_size, kv_tokens, overlap
):
    prompts, refs = prompts_and_refs
    eng = Engine(str(llama_dir), page_size=page_size, kv_cache_tokens=kv_tokens,
                 chunked_prefill_size=32, max_prefill_tokens=64, debug_invariants=True,
                 overlap_schedule=overlap)
    outs = eng.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == refs
    stats = eng.stats()
    assert stats.retractions > 0, "the pool was meant to be too small to avoid retraction"
    assert stats.evictions > 0
    _assert_idle_clean(eng)


def test_chunked_prefill_matches(llama_dir, hf_llama):
    rng = random.Random(3)
    long_prompt = [rng.randrange(3, 500) for _ in range(300)]
    ref = hf_greedy(hf_llama, long_prompt, 8)
    eng = Engine(str(llama_dir), page_size=16, chunked_prefill_size=64, max_prefill_tokens=64,
                 kv_cache_tokens=2048, debug_invariants=True)
    out = eng.generate([long_prompt], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
    assert out[0].token_ids == ref


def test_multi_turn_chat_reuses_history(llama_dir, hf_llama):
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=4096, debug_invariants=True)
    tok = eng.tokenizer
    params = SamplingParams(temperature=0, max_new_tokens=12)
    messages = [{"role": "system", "content": "You are a helpful assistant that answers briefly."},
                {"role": "user", "content": "What does a radix tree share between requests?"}]
    computed: list[int] = []  # tokens whose KV the previous turn left in the cache
    for turn in range(3):
        prompt_ids = eng.apply_chat_template(messages)
        out = eng.chat(messages, params)[0]
        assert out.token_ids == hf_greedy(hf_llama, prompt_ids, 12)[: len(out.token_ids)]
        if turn > 0:
            # Everything computed in the previous turn that this prompt starts with, page-aligned.
            shared = _lcp(computed, prompt_ids)
            expect = min(shared, len(prompt_ids) - 1) // 16 * 16
            assert out.cached_tokens == expect and expect >= 32
        # The last sampled token (or the matched eos) was never fed to the model.
        computed = prompt_ids + out.token_ids[:-1] if out.finish_reason == "length" else prompt_ids + out.token_ids
        messages += [{"role": "assistant", "content": tok.decode(out.token_ids, skip_special_tokens=True)},
                     {"role": "user", "content": f"And turn {turn + 2}?"}]
    _assert_idle_clean(eng)


def test_cache_salt_isolates_tenants(llama_dir):
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=4096)
    prompt = shared_prompt_batch(5, n=1, stem=80)[0]
    params = SamplingParams(temperature=0, max_new_tokens=4)
    a1 = eng.generate([prompt], params, cache_salt="tenant-a")[0]
    a2 = eng.generate([prompt], params, cache_salt="tenant-a")[0]
    b1 = eng.generate([prompt], params, cache_salt="tenant-b")[0]
    shared = eng.generate([prompt], params)[0]
    assert a1.cached_tokens == 0
    assert a2.cached_tokens == (len(prompt) - 1) // 16 * 16
    assert b1.cached_tokens == 0 and shared.cached_tokens == 0
    assert a1.token_ids == a2.token_ids == b1.token_ids == shared.token_ids


def test_parallel_samples_share_prompt_pages_and_follow_seeds(llama_dir):
    page = 16
    eng = Engine(str(llama_dir), page_size=page, kv_cache_tokens=4096, debug_invariants=True)
    prompt = shared_prompt_batch(7, n=1, stem=100)[0]  # > 6 pages
    n, new = 4, 6
    params = SamplingParams(temperature=1.0, n=n, seed=11, max_new_tokens=new, ignore_eos=True)
    core = eng.core
    core.add_request("fork", prompt, params)
    peak_used = 0
    outputs: dict[int, list[int]] = {i: [] for i in range(n)}
    while core.has_work():
        for d in core.step():
            outputs[d.index] += d.new_token_ids
        st = core.stats()
        peak_used = max(peak_used, st.total_pages - st.free_pages)
    prompt_pages = -(-len(prompt) // page)
    per_seq = -(-(len(prompt) + new) // page)
    # Unshared, n copies would need n * per_seq pages; shared, the full prompt pages exist once.
    assert peak_used <= prompt_pages + n * (per_seq - len(prompt) // page)
    assert peak_used < n * per_seq
    # Each sample i follows seed + i: an n=1 request with that seed reproduces it.
    for i in range(n):
        solo = eng.generate([prompt], SamplingParams(temperature=1.0, seed=11 + i,
                                                     max_new_tokens=new, ignore_eos=True))[0]
        assert solo.token_ids == outputs[i]
    assert len({tuple(v) for v in outputs.values()}) > 1
    _assert_idle_clean(eng)


def test_stop_conditions(llama_dir):
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=2048)
    prompt = shared_prompt_batch(9, n=1)[0]
    free = eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    # A stop token id ends generation before it is emitted.
    stop_tok = free.token_ids[5]
    first = free.token_ids.index(stop_tok)
    out = eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[stop_tok]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first]
    # A stop string is cut from the text.
    text = free.text
    needle = text[len(text) // 2 : len(text) // 2 + 3]
    if needle.strip():
        out = eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=20, stop=[needle], ignore_eos=True))[0]
        assert out.finish_reason == "stop" and needle not in out.text
        assert text.startswith(out.text) and len(out.text) == text.index(needle)
    _assert_idle_clean(eng)


def test_logprobs_match_transformers(llama_dir, hf_llama):
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=2048)
    prompt = shared_prompt_batch(13, n=1, stem=40)[0]
    eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=2))  # warm the cache
    out = eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True,
                                                logprobs=True, top_logprobs=3, prompt_logprobs=True))[0]
    full = prompt + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_llama(torch.tensor([full])).logits[0].float(), dim=-1)
    expect_prompt = [None] + [ref[i, full[i + 1]].item() for i in range(len(prompt) - 1)]
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert out.prompt_logprobs[1:] == pytest.approx(expect_prompt[1:], abs=1e-4)
    # Prompt logprobs are computed even though the prompt was cached.
    expect_gen = [ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expect_gen, abs=1e-4)
    top = out.outputs[0].top_logprobs
    assert top is not None and top[0][0][0] == out.token_ids[0]
    assert [v for _, v in top[0]] == sorted((v for _, v in top[0]), reverse=True)


def test_streaming_increments_concatenate(llama_dir):
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=2048)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    full = eng.generate(["Hello, world! How are you today?"], params)[0]
    chunks = list(eng.stream("Hello, world! How are you today?", params))
    assert "".join(c.text for c in chunks) == full.text
    assert sum((c.token_ids for c in chunks), []) == full.token_ids
    assert chunks[-1].finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),  # 0 is prefill only
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(deterministic_inference=True),  # CPU: no Triton kernels to make it batch-invariant
     dict(device="cuda", deterministic_inference=True, attention_backend="flashinfer")],
)
def test_deterministic_inference_rejects_what_it_cannot_guarantee(kwargs):
    with pytest.raises(ValueError, match="deterministic_inference"):
        EngineConfig(**kwargs)


def test_invalid_prompts_raise_and_nothing_leaks(llama_dir):
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=1024, max_context_len=256)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        eng.generate([[1, 2, 10**6]], GREEDY)
    with pytest.raises(ValueError, match="context window"):
        eng.generate([[5] * 300], GREEDY)
    ok = eng.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    assert len(ok[0].token_ids) == 3
    _assert_idle_clean(eng)


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _assert_idle_clean(eng: Engine) -> None:
    eng.check_invariants()
    st = eng.stats()
    assert st.running_requests == 0 and st.queued_requests == 0
    assert st.free_pages + st.evictable_pages == st.total_pages, "pages leaked at idle"


def test_prompt_logprobs_from_a_start_reuse_the_cached_stem(llama_dir, hf_llama):
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=2048, debug_invariants=True)
    prompt = shared_prompt_batch(17, n=1, stem=70)[0]
    eng.generate([prompt[:64]], SamplingParams(temperature=0, max_new_tokens=1))  # cache a stem
    start = 50
    out = eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=True,
                                                logprob_start_len=start))[0]
    assert out.cached_tokens == 48  # page-aligned and below start - 1 = 49
    with torch.no_grad():
        ref = torch.log_softmax(hf_llama(torch.tensor([prompt])).logits[0].float(), dim=-1)
    lps = out.prompt_logprobs
    assert lps is not None and len(lps) == len(prompt)
    assert all(v is None for v in lps[: out.cached_tokens + 1])
    for k in range(start, len(prompt)):
        assert lps[k] == pytest.approx(ref[k - 1, prompt[k]].item(), abs=1e-4)


def test_overlap_schedule_stops_like_the_synchronous_one(llama_dir):
    """With overlap, a step is launched before the previous one's tokens are read; stop tokens,
    stop strings, length limits and aborts must still end sequences at exactly the same token."""
    prompts = shared_prompt_batch(23, n=6)
    base = Engine(str(llama_dir), page_size=16, kv_cache_tokens=4096, overlap_schedule=False)
    free = base.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
    stop_ids = [o.token_ids[3] for o in free]
    ovl = Engine(str(llama_dir), page_size=16, kv_cache_tokens=4096, overlap_schedule=True,
                 debug_invariants=True)
    varied = [SamplingParams(temperature=0, max_new_tokens=5 + i, stop_token_ids=[stop_ids[i]])
              for i in range(len(prompts))]
    for eng in (base, ovl):
        outs = eng.generate(prompts, varied)
        for i, (o, f) in enumerate(zip(outs, free)):
            cut = min(f.token_ids.index(stop_ids[i]), 5 + i)
            assert o.token_ids == f.token_ids[:cut]
            assert o.finish_reason == ("stop" if cut < 5 + i else "length")
        _assert_idle_clean(eng)
    # A seeded sampled run is identical with and without overlap.
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_new_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in base.generate(prompts, seeded)] == [
        o.token_ids for o in ovl.generate(prompts, seeded)
    ]


def test_overlap_with_arrivals_mid_decode_matches_the_synchronous_schedule(llama_dir):
    """Requests that arrive while others decode are admitted into overlapped steps (decode rows
    fed by the previous step's device tokens, prefill rows from the host): same tokens."""
    first, second = shared_prompt_batch(31, n=4), shared_prompt_batch(32, n=4)
    params = [SamplingParams(temperature=0, max_new_tokens=10 + i, ignore_eos=True) for i in range(4)]
    seeded = SamplingParams(temperature=0.9, top_k=20, seed=3, max_new_tokens=9, ignore_eos=True)

    def run(overlap: bool) -> tuple[dict[str, list[int]], int]:
        eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=4096, overlap_schedule=overlap,
                     chunked_prefill_size=32, max_prefill_tokens=32, debug_invariants=True)
        core, out = eng.core, {}
        for i, p in enumerate(first):
            core.add_request(f"a{i}", p, params[i])
        steps = 0
        while core.has_work():
            if steps == 6:
                for i, p in enumerate(second):
                    core.add_request(f"b{i}", p, seeded if i % 2 else params[i])
            for d in core.step():
                out.setdefault(d.rid, []).extend(d.new_token_ids)
            steps += 1
        _assert_idle_clean(eng)
        return out, int(core.stats().extra["overlapped_steps"])

    sync_out, sync_overlapped = run(False)
    ovl_out, overlapped = run(True)
    assert ovl_out == sync_out
    assert sync_overlapped == 0 and overlapped > 10


@pytest.mark.parametrize("overlap", [False, True])
def test_aborts_free_everything_and_release_request_ids(llama_dir, overlap):
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=2048, debug_invariants=True,
                 overlap_schedule=overlap)
    core = eng.core
    prompt = shared_prompt_batch(41, n=1)[0]
    params = SamplingParams(temperature=1.0, n=3, seed=1, max_new_tokens=50, ignore_eos=True)
    core.add_request("x", prompt, params)
    core.abort_request("x")  # before its prompt was prefilled (the unforked n = 3 parent)
    reasons = [d.finish_reason for d in core.step()]
    assert reasons == ["abort"]
    core.add_request("x", prompt, params)  # the id is free again
    for _ in range(4):
        core.step()
    core.abort_request("x")  # mid-decode: all three samples end
    finished = [d for d in core.step() if d.finished]
    while core.has_work():  # with overlap, the step in flight is read one step later
        finished += [d for d in core.step() if d.finished]
    assert sorted(d.index for d in finished) == [0, 1, 2]
    assert all(d.finish_reason == "abort" for d in finished)
    assert not core.has_work()
    _assert_idle_clean(eng)
