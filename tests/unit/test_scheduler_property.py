"""Property test of the scheduler against a model whose every answer depends on its whole KV.

The "counting model" stores (token id, position) as K and V and attends with q = 0, so each
position's attention output is the mean over its context; its next token is
``(sum of all tokens so far * 31 + position) % V``. Any KV-cache mistake (a wrong slot, a page
freed while still read, a bad dedupe swap, a fork that copied the wrong page, a retraction that
resumed on the wrong prefix) changes a sum and therefore the tokens. Hypothesis drives random
arrivals, aborts, shared stems, tenants, n > 1, page sizes, chunking, tiny pools and overlap,
checking the cache invariants after every step and exact outputs at the end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixrt.attention.torch_ref import TorchReferenceBackend
from radixrt.cache.allocator import PageAllocator
from radixrt.cache.kv_pool import KVPool
from radixrt.cache.prefix_cache import make_prefix_cache
from radixrt.config import EngineConfig
from radixrt.engine.memory import SequenceMemory
from radixrt.engine.runner import ModelRunner
from radixrt.engine.sampler import Sampler
from radixrt.engine.scheduler import Scheduler
from radixrt.sampling_params import SamplingParams

VOCAB = 64
MAX_CONTEXT = 200


def next_token(tokens: list[int]) -> int:
    pos = len(tokens) - 1
    return (sum(tokens) * 31 + pos) % VOCAB


def reference(prompt: list[int], max_new: int, stop: int | None) -> tuple[list[int], str]:
    seq, out = list(prompt), []
    while len(out) < max_new and len(seq) < MAX_CONTEXT:
        tok = next_token(seq)
        if tok == stop:
            return out, "stop"  # a stop token ends the output and is not part of it
        out.append(tok)
        seq.append(tok)
    return out, "length"


class CountingModel(torch.nn.Module):
    def forward(self, input_ids, positions, attn):  # [T], [T] -> hidden [T, 2]
        t = input_ids.shape[0]
        kv = torch.stack([input_ids.float(), positions.float()], dim=-1).view(t, 1, 2)
        mean = attn(0, torch.zeros(t, 1, 2), kv, kv.clone()).view(t, 2)  # context means
        return torch.stack([mean[:, 0], positions.float()], dim=-1)

    def compute_logits(self, hidden):  # [N, 2] -> [N, V]
        pos = hidden[:, 1]
        total = torch.round(hidden[:, 0] * (pos + 1))  # mean * context length = sum of tokens
        nxt = ((total * 31 + pos) % VOCAB).long()
        return torch.nn.functional.one_hot(nxt, VOCAB).float() * 10.0


@dataclass
class Req:
    stem: int
    suffix: list[int]
    max_new: int
    n: int
    arrive: int
    abort: int | None
    salt: str | None
    stop: int | None


def build(page_size: int, pages: int, chunk: int, overlap: bool, policy: str, cache: bool,
          max_running: int = 8) -> Scheduler:
    config = EngineConfig(page_size=page_size, kv_cache_tokens=pages * page_size,
                          chunked_prefill_size=chunk, max_prefill_tokens=2 * chunk,
                          max_running_requests=max_running, overlap_schedule=overlap, schedule_policy=policy,
                          enable_prefix_cache=cache, debug_invariants=True)  # type: ignore[arg-type]
    pool = KVPool(num_layers=1, num_pages=pages, page_size=page_size, num_kv_heads=1, head_dim=2,
                  dtype=torch.float32, device="cpu")
    runner = ModelRunner(CountingModel(), pool, TorchReferenceBackend(1, 1, 2, 1.0))
    allocator = PageAllocator(pages)
    memory = SequenceMemory(allocator, make_prefix_cache(allocator, page_size, cache), page_size,
                            pool.copy_pages)
    return Scheduler(config, runner, memory, Sampler(), vocab_size=VOCAB,
                     max_context_len=MAX_CONTEXT, eos_token_ids=())


requests = st.lists(
    st.builds(
        Req,
        stem=st.integers(0, 2),
        suffix=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20),
        max_new=st.integers(1, 12),
        n=st.sampled_from([1, 1, 2]),
        arrive=st.integers(0, 12),
        abort=st.none() | st.integers(0, 20),
        salt=st.sampled_from([None, None, "tenant"]),
        stop=st.none() | st.integers(0, VOCAB - 1),
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=requests,
    page_size=st.sampled_from([1, 2, 4, 16]),
    spare_pages=st.integers(0, 40),
    chunk_pages=st.integers(1, 4),
    overlap=st.booleans(),
    policy=st.sampled_from(["lpm", "fcfs"]),
    cache=st.booleans(),
    max_running=st.sampled_from([2, 8]),
    seed=st.integers(0, 10**6),
)
def test_outputs_are_exact_and_nothing_leaks(reqs, page_size, spare_pages, chunk_pages, overlap,
                                             policy, cache, max_running, seed):
    rng = random.Random(seed)
    stems = [[rng.randrange(VOCAB) for _ in range(rng.randrange(0, 40))] for _ in range(3)]
    longest = max(len(stems[r.stem]) + len(r.suffix) + r.max_new for r in reqs)
    pages = -(-longest // page_size) + 1 + spare_pages // page_size
    chunk = max(page_size, chunk_pages * 8 // page_size * page_size)
    sched = build(page_size, pages, chunk, overlap, policy, cache, max_running)
    prompts = {f"r{i}": stems[r.stem] + r.suffix for i, r in enumerate(reqs)}
    outputs: dict[tuple[str, int], list[int]] = {}
    reasons: dict[tuple[str, int], str | None] = {}
    step = 0
    while step <= 12 or sched.has_work():
        for i, r in enumerate(reqs):
            rid = f"r{i}"
            if r.arrive == step:
                params = SamplingParams(temperature=0, max_new_tokens=r.max_new, n=r.n,
                                        stop_token_ids=() if r.stop is None else (r.stop,))
                sched.add_request(rid, prompts[rid], params, r.salt)
            if r.abort == step and r.arrive <= step:
                sched.abort_request(rid)
        for d in sched.step():
            outputs.setdefault((d.rid, d.index), []).extend(d.new_token_ids)
            if d.finished:
                assert (d.rid, d.index) not in reasons, f"{d.rid}/{d.index} finished twice"
                reasons[(d.rid, d.index)] = d.finish_reason
        step += 1
        assert step < 3000, "the scheduler stopped making progress"

    for i, r in enumerate(reqs):
        rid = f"r{i}"
        ref, ref_reason = reference(prompts[rid], r.max_new, r.stop)
        aborted = r.abort is not None and r.abort >= r.arrive
        for index in range(r.n):
            got = outputs.get((rid, index), [])
            reason = reasons.get((rid, index))
            if reason == "abort" or (aborted and reason is None):
                assert aborted, f"{rid}/{index} aborted without being asked to"
                assert got == ref[: len(got)], f"{rid}/{index}: aborted output is not a prefix"
            else:
                assert (reason, got) == (ref_reason, ref), f"{rid}/{index}: {got} != {ref}"
    stats = sched.stats()
    assert stats.running_requests == stats.queued_requests == 0
    assert stats.free_pages + stats.evictable_pages == stats.total_pages, "pages leaked"
    sched.memory.check_invariants([])
