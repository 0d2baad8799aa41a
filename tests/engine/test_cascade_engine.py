"""Shared-prefix (cascade) decode in the engine: the radix tree's locks group the running
requests, and greedy outputs with cascade on equal cascade off (gsp-like batches, prefix cache
on), on the torch path and on the Triton kernels (interpreter on CPU)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before radixrt imports its kernels

from radixrt import Engine, SamplingParams  # noqa: E402
from radixrt.attention.torch_ref import TorchReferenceBackend  # noqa: E402
from radixrt.cache.allocator import PageAllocator  # noqa: E402
from radixrt.cache.kv_pool import KVPool  # noqa: E402
from radixrt.cache.page_table import SequencePages  # noqa: E402
from radixrt.cache.prefix_cache import make_prefix_cache  # noqa: E402
from radixrt.cache.radix import RadixCache  # noqa: E402
from radixrt.config import EngineConfig  # noqa: E402
from radixrt.engine.cascade_groups import CascadePolicy, PrefixGrouper  # noqa: E402
from radixrt.engine.memory import SequenceMemory  # noqa: E402
from radixrt.engine.request import Sequence  # noqa: E402
from radixrt.engine.runner import ModelRunner  # noqa: E402
from radixrt.engine.sampler import Sampler  # noqa: E402
from radixrt.engine.scheduler import Scheduler  # noqa: E402
from tests.fixtures.counting import MAX_CONTEXT, VOCAB, CountingModel, reference  # noqa: E402

PS = 4


def _gsp(seed: int, groups: int, per_group: int, system: int, vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(groups):
        stem = [rng.randrange(3, vocab) for _ in range(system)]
        prompts += [stem + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 14))]
                    for _ in range(per_group)]
    prompts.append([rng.randrange(3, vocab) for _ in range(23)])  # shares nothing
    rng.shuffle(prompts)
    return prompts


def _kernels_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    from radixrt.kernels import cascade_decode

    return isinstance(cascade_decode._shared_prefix_kernel, InterpretedFunction)


def _check_groups_share_pages(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Wrap the step builder: every group it emits must name members whose page tables hold
    the same pages over the shared range, read through a member's row. Returns each group's
    request ids."""
    from radixrt.engine import step_builder

    build = step_builder.build
    seen: list[list[str]] = []

    def checked(work, table, **kw):  # type: ignore[no-untyped-def]
        out = build(work, table, **kw)
        groups = out.forward.cascade
        if groups is not None:
            assert out.forward.is_decode
            for g in range(groups.num_groups):
                members = groups.members[groups.indptr[g] : groups.indptr[g + 1]].tolist()
                n = int(groups.shared_lens[g]) // PS
                first = work[members[0]][0].pages
                assert groups.rows[g] == first.row
                for b in members:
                    seq = work[b][0]
                    assert seq.pages.pages[:n].tolist() == first.pages[:n].tolist(), "a member reads other pages"
                    assert seq.kv_len >= n * PS
                seen.append([work[b][0].rid for b in members])
        return out

    monkeypatch.setattr(step_builder, "build", checked)
    return seen


@pytest.mark.parametrize(("backend", "overlap"), [("torch", False), ("torch", True),
                                                  ("triton", False)])
def test_cascade_on_equals_off(backend, overlap, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and not _kernels_interpreted():
            pytest.skip("Triton kernels were imported without the interpreter (no CUDA)")
    prompts = _gsp(0, groups=2, per_group=4, system=37)
    params = [SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)] * len(prompts)
    # One request forks after its prefill: its samples share its whole prompt.
    params[0] = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True, n=2)
    outs = {}
    seen = _check_groups_share_pages(monkeypatch)
    for mode in ("off", "on"):
        eng = Engine("llama-tiny", load_format="dummy", page_size=PS, kv_cache_tokens=4096,
                     attention_backend=backend, cascade_decode=mode, debug_invariants=True,
                     overlap_schedule=overlap, seed=1)
        got = eng.generate(prompts, params)
        outs[mode] = [[s.token_ids for s in o.outputs] for o in got]
        grouper = eng.core.runner.cascade
        if mode == "off":
            assert grouper is None
        else:
            assert grouper is not None and grouper.grouped_steps > 0, "no decode step grouped"
            # 2 system-prompt groups of 4 (+1 fork) and nothing else: at most 9 per step.
            assert grouper.grouped_requests <= 9 * grouper.grouped_steps
        eng.core.check_invariants()
    assert outs["on"] == outs["off"]
    # The forked request's two samples join their system prompt's group (or pair off if their
    # prompt shares nothing): some group holds both.
    assert any(len(set(rids)) < len(rids) for rids in seen), "the forked samples never grouped"


def test_config_rejects_cascade_it_cannot_run():
    with pytest.raises(ValueError, match="cascade_decode"):
        EngineConfig(cascade_decode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cascade_decode"):
        EngineConfig(device="cuda", cascade_decode="on", deterministic_inference=True)
    with pytest.raises(ValueError, match="cascade_min_group"):
        EngineConfig(cascade_min_group=1)


def test_auto_resolves_by_device_backend_and_determinism():
    from radixrt.engine.runner import CASCADE_AUTO_ON_CUDA, cascade_policy

    assert cascade_policy(EngineConfig(device="cpu")) is None  # auto: never on CPU
    on_cuda = cascade_policy(EngineConfig(device="cuda"))
    assert (on_cuda is not None) == CASCADE_AUTO_ON_CUDA
    assert cascade_policy(EngineConfig(device="cuda", attention_backend="flashinfer")) is None
    assert cascade_policy(EngineConfig(device="cuda", deterministic_inference=True)) is None
    assert cascade_policy(EngineConfig(device="cuda", cascade_decode="off")) is None
    forced = cascade_policy(EngineConfig(device="cpu", cascade_decode="on", cascade_min_group=3))
    assert forced is not None and forced.min_group == 3


class _Loopback:
    """A TP group of two whose follower side reads back what rank 0 sent (one process)."""

    rank, size = 0, 2

    def __init__(self) -> None:
        self.plans: list[torch.Tensor] = []
        self.sent: list[torch.Tensor] = []
        self.receiving = False

    def send_plan(self, message: torch.Tensor) -> None:
        self.plans.append(message.clone())

    def recv_plan(self) -> torch.Tensor:
        return self.plans.pop(0)

    def broadcast_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.receiving:
            return x.copy_(self.sent.pop(0))
        self.sent.append(x.clone())
        return x


def test_tp_plan_carries_cascade_groups():
    """Followers get rank 0's groups with each decode step (and None when it has none), so every
    rank takes the cascade path for its KV-head shard."""
    from radixrt.distributed.plan import PlanSender, RecordingPageTable, receive_step
    from radixrt.engine.batch import build_forward_batch
    from radixrt.engine.cascade_groups import CascadeGroups

    tp = _Loopback()
    table = RecordingPageTable(num_rows=8, max_pages=8, page_size=PS, device="cpu")
    pool = KVPool(num_layers=1, num_pages=16, page_size=PS, num_kv_heads=1, head_dim=4,
                  dtype=torch.float32, device="cpu")
    sender = PlanSender(tp, table)  # type: ignore[arg-type]
    batch = build_forward_batch(new_token_ids=[[1]] * 4, prefix_lens=[9, 10, 13, 5],
                                page_tables=[[1, 2, 3], [1, 2, 4], [1, 5, 6, 7], [8, 9]],
                                page_size=PS, device="cpu")
    batch.cascade = CascadeGroups.of([(8, [0, 1, 2])], batch.req_rows_cpu)
    sender.send_forward(batch)
    sender.send_forward(build_forward_batch(new_token_ids=[[1], [2]], prefix_lens=[3, 4],
                                            page_tables=[[1], [2, 3]], page_size=PS,
                                            device="cpu"))
    tp.receiving = True
    got = receive_step(tp, table, pool)  # type: ignore[arg-type]
    assert got is not None and got.cascade is not None
    for name in ("indptr", "members", "shared_lens", "rows"):
        assert np.array_equal(getattr(got.cascade, name), getattr(batch.cascade, name)), name
    assert got.prefix_lens_cpu == batch.prefix_lens_cpu and got.req_rows_cpu == batch.req_rows_cpu
    plain = receive_step(tp, table, pool)  # type: ignore[arg-type]
    assert plain is not None and plain.cascade is None and plain.prefix_lens_cpu == [3, 4]


@pytest.mark.slow
def test_tp2_cascade_on_equals_tp1_off(tiny_model_dir):
    """TP=2 with cascade on (followers get the groups with each plan) gives TP=1 cascade off's
    greedy tokens (torch backend, fp32, CPU gloo)."""
    prompts = _gsp(3, groups=2, per_group=3, system=37)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    outs = {}
    for tp, mode in ((1, "off"), (2, "on")):
        eng = Engine(str(tiny_model_dir("llama")), kv_cache_tokens=4096, page_size=PS, tp_size=tp,
                     cascade_decode=mode, attention_backend="torch")
        try:
            outs[tp] = [o.outputs[0].token_ids for o in eng.generate(prompts, params)]
            if tp == 2:
                grouper = eng.core.runner.cascade
                assert grouper is not None and grouper.grouped_steps > 0, "no decode step grouped"
        finally:
            eng.core.close()
    assert outs[2] == outs[1]


def _running(cache: RadixCache, alloc: PageAllocator, tokens: list[int], handle_tokens: int,
             idx: int) -> Sequence:
    """A running sequence whose first ``handle_tokens`` are cached and locked, as after
    admission + commit_progress."""
    seq = Sequence(rid=f"r{idx}", index=0, prompt_ids=tokens, params=SamplingParams(),
                   namespace=None, arrival=idx, pages=SequencePages(PS))
    fresh = alloc.alloc(-(-len(tokens) // PS))
    assert fresh is not None
    res = cache.insert(np.array(tokens[:handle_tokens]), fresh[: handle_tokens // PS])
    seq.pages.pages = list(res.pages) + fresh[handle_tokens // PS :]
    cache.lock(res.handle)
    seq.cache_handle = res.handle
    seq.kv_len = len(tokens)
    return seq


def test_grouper_picks_the_node_sparing_most():
    """a/b share 24 tokens and a/b/c share 8: a and b group at 24 (sparing 24 > 2 x 8), c
    (alone at 8, below min_group) and d (no cached prefix) stay ungrouped; too-short shares, or
    groups sparing too little of the step's reads, never group."""
    alloc = PageAllocator(200)
    cache = RadixCache(alloc, PS)
    base = list(range(100, 108))
    ab = base + list(range(200, 216))
    a = _running(cache, alloc, ab + [1, 2, 3, 4, 5], 24, 0)
    b = _running(cache, alloc, ab + [9, 9, 9, 9, 9, 9, 9], 28, 1)
    c = _running(cache, alloc, base + list(range(300, 310)), 16, 2)
    d = Sequence(rid="d", index=0, prompt_ids=[5] * 9, params=SamplingParams(), namespace=None,
                 arrival=3, pages=SequencePages(PS))
    seqs = [c, a, d, b]
    rows, kv = [4, 5, 6, 7], [s.kv_len for s in seqs]
    grouper = PrefixGrouper(CascadePolicy(min_shared_pages=2, min_group=2), PS)
    groups = grouper.group(seqs, rows, kv)
    assert groups is not None and groups.num_groups == 1
    assert sorted(groups.members.tolist()) == [1, 3] and groups.shared_lens.tolist() == [24]
    assert groups.rows.tolist() == [5]
    assert a.pages.pages[:6].tolist() == b.pages.pages[:6].tolist(), "members read the same physical pages"
    # Cached paths give the same answer; a bigger page minimum drops the group.
    again = grouper.group(seqs, rows, kv)
    assert again is not None and again.members.tolist() == groups.members.tolist()
    strict = PrefixGrouper(CascadePolicy(min_shared_pages=7, min_group=2), PS)
    assert strict.group(seqs, rows, kv) is None
    # a/b spare 24 of the step's 82 KV reads: worth it at a 5% bar, not at 50%.
    assert PrefixGrouper(CascadePolicy(min_saved_share=0.5), PS).group(seqs, rows, kv) is None
    # With three required, a, b and c group at their common 8 tokens.
    three = PrefixGrouper(CascadePolicy(min_shared_pages=2, min_group=3), PS)
    g3 = three.group(seqs, rows, kv)
    assert g3 is not None and sorted(g3.members.tolist()) == [0, 1, 3]
    assert g3.shared_lens.tolist() == [8]


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_cascade_on_equals_off(graphs):
    """On CUDA (Triton kernels, overlap, CUDA graphs captured with and without groups), fp32:
    cascade on gives cascade off's greedy tokens, and grouped steps replay the grouped graphs."""
    prompts = _gsp(3, groups=3, per_group=6, system=150)
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    outs = {}
    for mode in ("off", "on"):
        eng = Engine("llama-tiny", load_format="dummy", device="cuda", dtype="float32",
                     page_size=16, kv_cache_tokens=8192, max_running_requests=32,
                     cascade_decode=mode, disable_cuda_graph=not graphs, debug_invariants=True,
                     seed=1)
        outs[mode] = [o.token_ids for o in eng.generate(prompts, params)]
        runner = eng.core.runner
        if mode == "on":
            assert runner.cascade is not None and runner.cascade.grouped_steps > 0
            if graphs:
                assert runner.graphs is not None
                assert any(key[:2] == (32, True) for key in runner.graphs.graphs)
        eng.core.check_invariants()
    assert outs["on"] == outs["off"]


def test_grouper_keeps_a_subtree_with_its_wider_group():
    """Two samples of one request (same handle, 20 tokens) and two others under the same
    12-token system prompt: all four group at 12 (3 x 12 spared) rather than the pair at 20
    (1 x 20) plus a pair at 12 (1 x 12)."""
    alloc = PageAllocator(200)
    cache = RadixCache(alloc, PS)
    system = list(range(100, 112))
    forked = system + list(range(400, 408))
    s1 = _running(cache, alloc, forked + [7], 20, 0)
    s2 = _running(cache, alloc, forked + [8], 20, 1)
    o1 = _running(cache, alloc, system + list(range(500, 510)), 20, 2)
    o2 = _running(cache, alloc, system + list(range(600, 607)), 16, 3)
    seqs = [s1, o1, s2, o2]
    groups = PrefixGrouper(CascadePolicy(min_saved_share=0.0), PS).group(
        seqs, [1, 2, 3, 4], [s.kv_len for s in seqs])
    assert groups is not None and groups.num_groups == 1
    assert sorted(groups.members.tolist()) == [0, 1, 2, 3] and groups.shared_lens.tolist() == [12]


def _counting_scheduler(page_size: int, pages: int, chunk: int, overlap: bool,
                        max_running: int) -> Scheduler:
    """tests/fixtures/counting.py's scheduler, with the torch backend's cascade path on and
    groups formed at every chance (one shared page, any saving)."""
    config = EngineConfig(page_size=page_size, kv_cache_tokens=pages * page_size,
                          chunked_prefill_size=chunk, max_prefill_tokens=2 * chunk,
                          max_running_requests=max_running, overlap_schedule=overlap,
                          debug_invariants=True)
    pool = KVPool(num_layers=1, num_pages=pages, page_size=page_size, num_kv_heads=1, head_dim=2,
                  dtype=torch.float32, device="cpu")
    policy = CascadePolicy(min_shared_pages=1, min_group=2, min_saved_share=0.0)
    runner = ModelRunner(CountingModel(), pool, TorchReferenceBackend(1, 1, 2, 1.0, cascade=policy))
    allocator = PageAllocator(pages)
    memory = SequenceMemory(allocator, make_prefix_cache(allocator, page_size, True), page_size,
                            pool.copy_pages)
    return Scheduler(config, runner, memory, Sampler(), vocab_size=VOCAB,
                     max_context_len=MAX_CONTEXT, eos_token_ids=())


GROUPED_STEPS: list[int] = []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(st.tuples(st.integers(0, 1),  # stem
                            st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
                            st.integers(1, 12),  # max new tokens
                            st.sampled_from([1, 1, 2]),  # n
                            st.integers(0, 6)),  # arrival step
                  min_size=2, max_size=10),
    page_size=st.sampled_from([1, 2, 4]),
    spare_pages=st.integers(0, 30),
    overlap=st.booleans(),
    max_running=st.sampled_from([3, 8]),
    seed=st.integers(0, 10**6),
)
def test_counting_model_exact_under_cascade(reqs, page_size, spare_pages, overlap, max_running,
                                            seed):
    """The counting model's every token is the sum of its whole KV: with grouping at every
    chance (stems, forks, tiny pools that retract, overlap), outputs stay exact."""
    rng = random.Random(seed)
    stems = [[rng.randrange(VOCAB) for _ in range(rng.randrange(4, 40))] for _ in range(2)]
    longest = max(len(stems[s]) + len(suf) + new for s, suf, new, _, _ in reqs)
    pages = -(-longest // page_size) + 1 + spare_pages // page_size
    sched = _counting_scheduler(page_size, pages, max(page_size, 16), overlap, max_running)
    prompts = {f"r{i}": stems[s] + suf for i, (s, suf, _, _, _) in enumerate(reqs)}
    outputs: dict[tuple[str, int], list[int]] = {}
    step = 0
    while step <= 6 or sched.has_work():
        for i, (_, _, new, n, arrive) in enumerate(reqs):
            if arrive == step:
                sched.add_request(f"r{i}", prompts[f"r{i}"],
                                  SamplingParams(temperature=0, max_new_tokens=new, n=n))
        for d in sched.step():
            outputs.setdefault((d.rid, d.index), []).extend(d.new_token_ids)
        step += 1
        assert step < 3000, "the scheduler stopped making progress"
    for i, (_, _, new, n, _) in enumerate(reqs):
        ref, _ = reference(prompts[f"r{i}"], new, None)
        for index in range(n):
            assert outputs.get((f"r{i}", index)) == ref, f"r{i}/{index}"
    grouper = sched.runner.cascade
    assert grouper is not None
    GROUPED_STEPS.append(grouper.grouped_steps)
    sched.memory.check_invariants([])


def test_counting_property_exercised_groups():
    """The property test above formed groups in most of its examples (it ran first)."""
    if not GROUPED_STEPS:
        pytest.skip("run together with test_counting_model_exact_under_cascade")
    assert sum(g > 0 for g in GROUPED_STEPS) >= len(GROUPED_STEPS) // 2
