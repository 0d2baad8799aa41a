"""Property test of the scheduler against a model whose every answer depends on its whole KV.

The "counting model" stores (token id, position) as K and V and attends with q = 0, so each
position's attention output is the mean over its context; its next token is
``(sum of all tokens so far * 31 + position) % V``. Any KV-cache mistake (a wrong slot, a page
freed while still read, a bad dedupe swap, a fork that copied the wrong page, a retraction that
resumed on the wrong prefix) changes a sum and therefore the tokens. Hypothesis drives random
arrivals, aborts, shared stems, tenants, n > 1, page sizes, chunking, tiny pools and overlap,
checking the cache invariants after every step, that every retraction takes the newest running
sequence, and exact outputs and prompt logprobs at the end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixrt.engine.request import Sequence
from radixrt.sampling_params import SamplingParams
from tests.fixtures.counting import VOCAB, build, prompt_logprob_reference, reference


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
    prompt_logprobs: bool
    logprob_start: int


requests = st.lists(
    st.builds(
        Req,
        stem=st.integers(0, 2),
        suffix=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20),
        max_new=st.integers(1, 12),
        n=st.sampled_from([1, 1, 2]),
        arrive=st.integers(0, 12),
        abort=st.none() | st.integers(0, 20),
        salt=st.sampled_from([None, None, "a", "b"]),  # tenants sharing the same stems
        stop=st.none() | st.integers(0, VOCAB - 1),
        prompt_logprobs=st.booleans(),
        logprob_start=st.integers(0, 50),
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
    retract = sched.requests.retract

    def retract_newest(victim: Sequence) -> None:
        newest = max(sched.requests.running, key=lambda s: s.arrival)
        assert victim is newest, (
            f"retracted {victim.rid}/{victim.index} (arrival {victim.arrival}) while "
            f"{newest.rid}/{newest.index} (arrival {newest.arrival}) is newer"
        )
        retract(victim)

    setattr(sched.requests, "retract", retract_newest)  # noqa: B010 (an instance spy)
    prompts = {f"r{i}": stems[r.stem] + r.suffix for i, r in enumerate(reqs)}
    outputs: dict[tuple[str, int], list[int]] = {}
    reasons: dict[tuple[str, int], str | None] = {}
    prompt_lps: dict[tuple[str, int], list[float | None]] = {}
    step = 0
    while step <= 12 or sched.has_work():
        for i, r in enumerate(reqs):
            rid = f"r{i}"
            if r.arrive == step:
                params = SamplingParams(temperature=0, max_new_tokens=r.max_new, n=r.n,
                                        stop_token_ids=() if r.stop is None else (r.stop,),
                                        prompt_logprobs=r.prompt_logprobs,
                                        logprob_start_len=r.logprob_start)
                sched.add_request(rid, prompts[rid], params, r.salt)
            if r.abort == step and r.arrive <= step:
                sched.abort_request(rid)
        for d in sched.step():
            outputs.setdefault((d.rid, d.index), []).extend(d.new_token_ids)
            if d.prompt_logprobs is not None:
                assert (d.rid, d.index) not in prompt_lps, f"{d.rid}/{d.index}: sent twice"
                prompt_lps[(d.rid, d.index)] = d.prompt_logprobs
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
                assert r.prompt_logprobs == ((rid, index) in prompt_lps), f"{rid}/{index}"
            if (rid, index) in prompt_lps:
                check_prompt_logprobs(prompt_lps[(rid, index)], prompts[rid], r.logprob_start)
    stats = sched.stats()
    assert stats.running_requests == stats.queued_requests == 0
    assert stats.free_pages + stats.evictable_pages == stats.total_pages, "pages leaked"
    sched.memory.check_invariants([])


def check_prompt_logprobs(got: list[float | None], prompt: list[int], start: int) -> None:
    """One entry per prompt token; every entry from ``start`` on (never entry 0) is scored and
    exact; entries before it may be None (served from the cache) or exact."""
    want = prompt_logprob_reference(prompt)
    assert len(got) == len(prompt), f"{len(got)} prompt logprobs for {len(prompt)} tokens"
    for k, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"entry 0 (nothing precedes it) is {g}"
        elif g is None:
            assert k < start, f"prompt logprob {k} is missing (logprob_start_len {start})"
        else:
            assert abs(g - w) < 1e-4, f"prompt logprob {k}: {g} != {w}"
