"""Tensor parallelism on CPU (gloo, 2 processes): TP=2 gives TP=1's greedy tokens and its
logprobs within fp32 rounding, for Llama, Qwen2 (tied head, qkv bias), Qwen3 (q/k norm, explicit
head_dim) and an MQA Llama (1 KV head: replicated on both ranks), with the prefix cache on,
forks (n > 1: page copies on every rank), eviction and retraction; a dead follower fails the
replica cleanly; closing the engine leaves no follower behind; a server with --tp 2 answers the
openai client."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import torch

from radixrt import Engine, SamplingParams
from radixrt.distributed.group import TPPeerLost
from radixrt.engine.core import is_device_fault
from radixrt.models.args import ModelArgs
from radixrt.models.loader import read_config
from radixrt.models.shard import ShardPlan
from tests.fixtures import tiny_models

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True, logprobs=True,
                        top_logprobs=3)
PROMPT_LP = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True,
                           prompt_logprobs=True)
ATOL = 2e-4  # fp32: the two ranks' partial sums add in another order than one matmul


def _prompts(seed: int, n: int = 6, stem: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(3, 500) for _ in range(stem)]
    return [system + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 24))] for _ in range(n)]


@pytest.fixture(scope="module")
def mqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama with one KV head (fewer than ranks), in HF format."""
    import transformers

    out = tmp_path_factory.mktemp("mqa")
    config = tiny_models._hf_config("LlamaForCausalLM", {"num_key_value_heads": 1})
    model = transformers.LlamaForCausalLM(config)
    tiny_models._randomize(model, seed=7)
    model.save_pretrained(str(out))
    tiny_models.build_tokenizer().save_pretrained(str(out))
    return out


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams):
    return engine.generate(prompts, params)


def _close(engine: Engine) -> None:
    engine.core.close()


def _assert_same(ref, got) -> None:
    for r, g in zip(ref, got, strict=True):
        assert g.token_ids == r.token_ids, "TP=2 greedy tokens differ from TP=1"
        if r.logprobs is not None:
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(r.logprobs),
                                       atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- sharding rules


def test_shard_plan_splits_and_replicates(tiny_model_dir, mqa_dir) -> None:
    args = ModelArgs.from_hf_config(read_config(tiny_model_dir("llama")))  # 4 q heads, 2 KV
    r1 = ShardPlan.of(args, _FakeTP(1, 2))
    assert (r1.num_heads, r1.num_kv_heads, r1.kv_head_start) == (2, 1, 1)
    assert r1.rule("model.layers.0.self_attn.k_proj.weight") == (0, 16, 16)
    assert r1.rule("model.layers.0.self_attn.o_proj.weight") == (1, 32, 32)
    assert r1.rule("model.layers.0.mlp.down_proj.weight") == (1, 64, 64)
    assert r1.rule("model.norm.weight") is None
    mqa = ModelArgs.from_hf_config(read_config(mqa_dir))
    for rank in (0, 1):  # the one KV head lives on both ranks
        p = ShardPlan.of(mqa, _FakeTP(rank, 2))
        assert (p.num_kv_heads, p.kv_head_start) == (1, 0)
    # Vocab 512 over 3 ranks is not needed by any test model, but the padding rule is:
    odd = ShardPlan(rank=2, size=3, num_heads=1, num_kv_heads=1, kv_head_start=0, head_dim=16,
                    intermediate=8, vocab=512, vocab_rows=171)
    assert odd.rule("lm_head.weight") == (0, 342, 170)
    with pytest.raises(ValueError, match="must divide the 4 attention heads"):
        ShardPlan.check(args, 3)


class _FakeTP:
    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size


# --------------------------------------------------------------------------- engines


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3", "mqa"])
def test_tp2_matches_tp1(variant: str, tiny_model_dir, mqa_dir) -> None:
    model = str(mqa_dir if variant == "mqa" else tiny_model_dir(variant))
    prompts = _prompts(1)
    forks = SamplingParams(temperature=0.8, top_p=0.9, n=2, seed=3, max_new_tokens=6,
                           ignore_eos=True)
    results = {}
    for tp in (1, 2):
        engine = Engine(model, kv_cache_tokens=4096, tp_size=tp)
        try:
            first = _run(engine, prompts, GREEDY)
            again = _run(engine, prompts, GREEDY)  # every prompt now hits the cache
            plp = _run(engine, prompts[:2], PROMPT_LP)
            sampled = _run(engine, prompts[:2], forks)  # n=2: forks copy the partial page
            engine.check_invariants()
            results[tp] = (first, again, plp, sampled)
        finally:
            _close(engine)
    (f1, a1, p1, s1), (f2, a2, p2, s2) = results[1], results[2]
    _assert_same(f1, a1)
    _assert_same(f1, f2)
    _assert_same(f1, a2)
    assert all(o.cached_tokens >= 32 for o in a2), "the second pass must hit rank 0's cache"
    for r, g in zip(p1, p2, strict=True):
        assert len(g.prompt_logprobs) == len(r.prompt_logprobs)
        torch.testing.assert_close(torch.tensor(g.prompt_logprobs[1:]),
                                   torch.tensor(r.prompt_logprobs[1:]), atol=ATOL, rtol=0)
    assert [o.token_ids for o in s2] == [o.token_ids for o in s1], "seeded forks differ"


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True])
def test_tp2_under_eviction_and_retraction(tiny_model_dir, overlap: bool) -> None:
    """``overlap``: step N+1 is launched with input ids filled on rank 0's device from step N's
    draw; followers get them by the device broadcast, never through rank 0's host."""
    model = str(tiny_model_dir("llama"))
    # The 150-token prompt runs in 64-token chunks: steps whose batch needs no logits rows.
    prompts = _prompts(2, n=8, stem=24) + [list(range(3, 153))]
    params = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    ref_engine = Engine(model, kv_cache_tokens=8192)
    try:
        ref = _run(ref_engine, prompts, params)
    finally:
        _close(ref_engine)
    # 20 pages of 16 tokens for 8 sequences growing to ~80 tokens each: decode must retract,
    # and later admissions evict the cached stems.
    engine = Engine(model, kv_cache_tokens=320, tp_size=2, max_prefill_tokens=2048,
                    chunked_prefill_size=64, debug_invariants=True, overlap_schedule=overlap)
    try:
        got = _run(engine, prompts, params)
        got_again = _run(engine, prompts[::-1], params)
        stats = engine.stats()
        overlapped = engine.core.scheduler.overlapped_steps
    finally:
        _close(engine)
    assert overlapped > 0 if overlap else overlapped == 0, f"{overlapped} overlapped steps"
    assert stats.retractions > 0 and stats.evictions > 0, f"no pressure: {stats}"
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert [o.token_ids for o in got_again] == [o.token_ids for o in ref[::-1]]


# --------------------------------------------------------------------------- lifetime


@pytest.mark.slow
def test_dead_follower_fails_the_replica_and_close_leaves_no_orphan(tiny_model_dir) -> None:
    engine = Engine(str(tiny_model_dir("llama")), kv_cache_tokens=1024, tp_size=2)
    followers = engine.core.runner.tp_followers
    assert followers is not None and len(followers.procs) == 1
    try:
        assert _run(engine, [[5, 6, 7]], GREEDY)[0].completion_tokens == GREEDY.max_new_tokens
        os.kill(followers.procs[0].pid, signal.SIGKILL)
        followers.procs[0].wait(timeout=30)
        with pytest.raises(TPPeerLost) as info:
            _run(engine, [[5, 6, 7, 8]], GREEDY)
        assert is_device_fault(info.value), "a lost rank must replace the worker"
    finally:
        _close(engine)


@pytest.mark.slow
def test_close_stops_followers(tiny_model_dir) -> None:
    engine = Engine(str(tiny_model_dir("qwen2")), kv_cache_tokens=1024, tp_size=2)
    followers = engine.core.runner.tp_followers
    assert followers is not None
    _run(engine, [[9, 10, 11]], GREEDY)
    _close(engine)
    assert all(p.poll() == 0 for p in followers.procs), "a follower did not exit cleanly"
    _close(engine)  # idempotent


def test_tp_config_rejections() -> None:
    from radixrt.config import EngineConfig
    from radixrt.server.config import ServerConfig

    with pytest.raises(ValueError, match="tp_size"):
        EngineConfig(tp_size=0)
    with pytest.raises(ValueError, match="host KV tier"):
        EngineConfig(tp_size=2, host_kv_cache_tokens=1024)
    with pytest.raises(ValueError, match="tp x dp must be <= 64"):
        ServerConfig(tp_size=8, dp=9)
    ServerConfig(tp_size=2, dp=2)  # M replicas of N ranks


# --------------------------------------------------------------------------- server


PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 2


@pytest.mark.slow
def test_server_with_tp2_answers_openai(tiny_model_dir, tmp_path) -> None:
    from openai import OpenAI

    from tests.e2e.conftest import start_server

    model = tiny_model_dir("llama")
    server = start_server(model, tmp_path, "--tp", "2", "--kv-cache-tokens", "2048")
    followers = [pid for w in server.worker_pids() for pid in _children(w)]
    assert len(followers) == 1, f"one follower rank per worker, found {followers}"
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        # Longer than two pages: only whole pages are cached.
        kwargs = dict(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=8,
                      temperature=0)
        first = client.completions.create(**kwargs)
        second = client.completions.create(**kwargs)
        assert first.usage.completion_tokens == 8
        assert second.choices[0].text == first.choices[0].text
        assert second.usage.prompt_tokens_details.cached_tokens > 0
        ref = Engine(str(model), kv_cache_tokens=2048)
        try:
            want = ref.generate([PROMPT], SamplingParams(temperature=0, max_new_tokens=8))[0]
        finally:
            _close(ref)
        assert first.choices[0].text == want.text
        # An idle replica's dead rank is found by the router's next ping: the worker exits
        # (a device fault) and the supervisor starts a new one, with its own follower.
        import time

        worker = server.worker_pids()[-1]
        os.kill(followers[0], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.worker_pids()[-1] == worker:
            time.sleep(0.2)
        assert server.worker_pids()[-1] != worker, "the worker outlived its dead rank"
        while time.monotonic() < deadline and not _children(server.worker_pids()[-1]):
            time.sleep(0.2)
        followers += _children(server.worker_pids()[-1])
        assert client.completions.create(**kwargs).choices[0].text == want.text
    finally:
        assert server.stop() == 0
    assert not any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in followers), (
        "a follower rank outlived its server")


@pytest.mark.slow
def test_server_tp2_dp2_serves_and_a_dead_rank_fails_only_its_replica(tiny_model_dir,
                                                                      tmp_path) -> None:
    """4 worker-side processes (2 replicas x 2 ranks): the API answers; killing one replica's
    follower rank ends that replica's stream with a 503 while the other replica's stream
    finishes, and the supervisor brings the replica back."""
    import json
    import threading
    import time

    import httpx
    from openai import OpenAI

    from tests.e2e.conftest import start_server

    server = start_server(tiny_model_dir("llama"), tmp_path, "--tp", "2", "--dp", "2",
                          "--kv-cache-tokens", "2048")
    try:
        workers = server.worker_pids()
        followers = {w: _children(w) for w in workers}
        assert len(workers) == 2 and all(len(f) == 1 for f in followers.values()), followers
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        name = client.models.list().data[0].id
        chat = client.chat.completions.create(model=name, max_tokens=6, temperature=0,
                                              messages=[{"role": "user", "content": "hi"}])
        assert chat.usage.completion_tokens == 6
        chunks = list(client.completions.create(model=name, prompt=PROMPT, max_tokens=6,
                                                temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices)
        # Two long streams at once: the router gives them to different (least-loaded) replicas.
        ends: list[dict] = []
        started = threading.Barrier(3)

        def stream(prompt: str) -> None:
            body = {"prompt": prompt, "max_tokens": 400, "ignore_eos": True, "temperature": 0,
                    "stream": True}
            last: dict = {}
            first = True
            with httpx.stream("POST", server.url + "/v1/completions", json=body,
                              timeout=180) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        last = json.loads(line[6:])
                        if first:
                            started.wait()
                            first = False
            ends.append(last)

        threads = [threading.Thread(target=stream, args=(p,)) for p in ("one two", "three four")]
        for t in threads:
            t.start()
        started.wait(timeout=120)
        os.kill(followers[workers[0]][0], signal.SIGKILL)
        for t in threads:
            t.join(timeout=180)
        errors = [e["error"] for e in ends if "error" in e]
        assert len(ends) == 2 and len(errors) == 1, ends
        assert errors[0]["code"] == 503, errors
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(server.worker_pids()) < 3:
            time.sleep(0.2)
        assert len(server.worker_pids()) == 3, "the failed replica was not restarted"
        while time.monotonic() < deadline and httpx.get(server.url + "/health").status_code != 200:
            time.sleep(0.2)
        again = client.completions.create(model=name, prompt="after", max_tokens=3)
        assert again.usage.completion_tokens == 3
    finally:
        assert server.stop() == 0


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------------- CUDA (NCCL)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("variant", ["llama", "qwen3", "mqa"])
def test_cuda_tp2_matches_tp1(variant: str, tiny_model_dir, mqa_dir) -> None:
    """NCCL all-reduces captured in the decode CUDA graphs, overlap on (the CUDA default):
    same tokens as TP=1, logprobs within fp32 kernel rounding, under retraction too."""
    model = str(mqa_dir if variant == "mqa" else tiny_model_dir(variant))
    prompts = _prompts(3, n=8)
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True, logprobs=True)
    results = {}
    for tp in (1, 2):
        for kv in (8192, 320):  # 320 tokens: retraction and eviction
            engine = Engine(model, device="cuda", dtype="float32", kv_cache_tokens=kv, tp_size=tp,
                            cuda_graph_max_batch=16)  # few graphs: the 8 prompts decode in them
            try:
                assert engine.core.runner.graphs is not None, "decode must replay CUDA graphs"
                results[tp, kv] = (_run(engine, prompts, params), _run(engine, prompts, params))
            finally:
                _close(engine)
    for kv in (8192, 320):
        for r, g in zip(results[1, kv], results[2, kv], strict=True):
            for ro, go in zip(r, g, strict=True):
                assert go.token_ids == ro.token_ids, f"kv={kv}: TP=2 tokens differ"
                torch.testing.assert_close(torch.tensor(go.logprobs), torch.tensor(ro.logprobs),
                                           atol=1e-3, rtol=0)
