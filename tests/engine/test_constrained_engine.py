"""Grammar-constrained decoding through the real scheduler on a tiny random model: every output
matches its regex / validates against its schema, with overlap on and off, n > 1, the prefix
cache, retraction under a tiny pool and aborts; logit_bias removes and forces tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from radixrt import Engine, SamplingParams
from tests.fixtures import json_schema_check as jsonschema
from tests.fixtures.processes import process_gone
from tests.fixtures.tiny_models import EOS_ID

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "n", "tags"], "additionalProperties": False}
REGEX = r"(red|green|blue)-[0-9]{2}"


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


def _prompts(n: int) -> list[list[int]]:
    stem = list(range(10, 50))  # a shared stem: later requests hit the prefix cache
    return [stem + [60 + i, 70 + i] for i in range(n)]


@pytest.mark.parametrize("overlap,kv_tokens", [(False, 4096), (True, 4096), (True, 96)])
def test_constrained_outputs_always_valid(llama_dir, overlap, kv_tokens):
    eng = Engine(str(llama_dir), page_size=4, kv_cache_tokens=kv_tokens, overlap_schedule=overlap)
    tok = eng.tokenizer
    schema_p = SamplingParams(temperature=1.0, seed=3, max_new_tokens=120, n=2,
                              json_schema=json.dumps(SCHEMA))
    regex_p = SamplingParams(temperature=0.7, seed=5, max_new_tokens=40, regex=REGEX)
    free_p = SamplingParams(temperature=0.0, max_new_tokens=12)
    prompts = _prompts(9)
    params = [schema_p, regex_p, free_p] * 3
    outs = eng.generate(prompts, params)
    checked = 0
    for out, p in zip(outs, params):
        for c in out.outputs:
            text = tok.decode(c.token_ids)
            if p.json_schema is not None and c.finish_reason == "stop":
                jsonschema.validate(json.loads(text), SCHEMA)
                checked += 1
            elif p.regex is not None and c.finish_reason == "stop":
                assert re.fullmatch(REGEX, text), text
                checked += 1
            elif p.constraint is not None:
                # Cut by max_new_tokens: still a prefix the grammar allows, never garbage.
                assert c.finish_reason == "length"
    assert checked >= 6, "too few constrained outputs finished to check"
    if kv_tokens < 1000:
        assert eng.stats().retractions > 0, "the tiny pool was meant to force retraction"
    if overlap:  # constrained steps defer only their draw: the scheduler keeps overlapping
        assert eng.stats().extra["overlapped_steps"] > 10
    eng.core.check_invariants()


def test_logit_bias_removes_and_forces(llama_dir):
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=4096)
    prompt = _prompts(1)
    free = eng.generate(prompt, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    first = free[0].outputs[0].token_ids[0]
    banned = eng.generate(prompt, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True,
                                                 logit_bias={first: -100}))
    assert first not in banned[0].outputs[0].token_ids[:1]
    forced = eng.generate(prompt, SamplingParams(temperature=1.0, seed=1, max_new_tokens=5,
                                                 ignore_eos=True, logit_bias={77: 100}))
    assert forced[0].outputs[0].token_ids == [77] * 5


def test_bad_grammar_is_refused_before_anything_runs(llama_dir):
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=4096)
    with pytest.raises(ValueError, match="regex"):
        eng.generate(_prompts(1), SamplingParams(regex="a(b", max_new_tokens=4))
    assert not eng.core.has_work()


def test_constrained_stream_ends_with_stop_token(llama_dir):
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=4096, overlap_schedule=True)
    out = eng.generate(_prompts(1), SamplingParams(temperature=0, max_new_tokens=30,
                                                   regex="(yes|no)"))[0].outputs[0]
    assert eng.tokenizer.decode(out.token_ids) in ("yes", "no")
    assert out.finish_reason == "stop" and EOS_ID not in out.token_ids


def test_slow_grammar_waits_outside_the_queue(llama_dir, monkeypatch):
    """A grammar still compiling parks its request: other requests keep running, the parked
    one joins when compiled; one that overruns the timeout ends with an invalid-grammar error;
    an abort while parked drops it."""
    import threading

    from radixrt.constrained import sequences

    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=4096)
    core = eng.core
    grammars = core.scheduler.results.grammars
    assert grammars is not None
    gate = threading.Event()
    real = grammars.compiler._compile

    def slow(key):
        gate.wait(30)
        return real(key)

    monkeypatch.setattr(grammars.compiler, "_compile", slow)
    p = SamplingParams(temperature=0, max_new_tokens=8, regex="(yes|no)")
    core.add_request("slow", _prompts(1)[0], p)
    core.add_request("gone", _prompts(1)[0], SamplingParams(max_new_tokens=4, regex="[ab]+"))
    core.abort_request("gone")
    core.add_request("free", _prompts(2)[1], SamplingParams(temperature=0, max_new_tokens=3))
    assert grammars.is_parked("slow") and not grammars.is_parked("gone")
    done: dict[str, object] = {}
    for _ in range(40):  # "free" runs to the end while "slow" compiles
        for d in core.step():
            if d.finished:
                done[d.rid] = d
        if "free" in done:
            break
    assert "free" in done and grammars.is_parked("slow")
    gate.set()
    while core.has_work():
        for d in core.step():
            if d.finished:
                done[d.rid] = d
    assert done["slow"].finish_reason == "stop" and "gone" not in done
    monkeypatch.setattr(sequences, "SYNC_COMPILE_WAIT_S", 0.0)
    gate.clear()
    grammars.compile_timeout_s = 0.05
    core.add_request("late", _prompts(1)[0], SamplingParams(max_new_tokens=4, regex="x+y"))
    deltas = []
    while core.has_work():
        deltas += core.step()
    gate.set()
    (d,) = [d for d in deltas if d.rid == "late"]
    assert d.finish_reason == "abort" and d.error.startswith(sequences.GRAMMAR_ERROR_PREFIX)


@pytest.mark.parametrize("overlap", [False, True])
def test_fused_and_unfused_grammar_paths_agree(llama_dir, overlap, monkeypatch):
    """The fused path (fill threads advance and fill each shard) and the unfused one (the
    scheduler thread advances, xgrammar's pool fills) give the same tokens, for any thread
    count and however a step's tokens reach the host: at once (the CPU), late (``slow``: the
    fill threads wait for them while the next step is planned, as on a GPU), or with the
    early advance only for tokens already there (``ready``: half the time they are not);
    also with a grammar copy per fill thread (``copies``); enough rows that the shards run
    on their threads."""
    import time

    from radixrt.engine.sampler import PendingSample

    real_ready, real_tokens = PendingSample.ready, PendingSample.host_tokens
    flip = iter(range(10**6))

    def slow_tokens(self):
        time.sleep(0.002)  # the draw is still on the device
        return real_tokens(self)

    schema_p = SamplingParams(temperature=1.0, seed=11, max_new_tokens=60, n=2,
                              json_schema=json.dumps(SCHEMA))
    regex_p = SamplingParams(temperature=0.0, max_new_tokens=20, regex=REGEX)
    params = [schema_p, regex_p, SamplingParams(temperature=0.0, max_new_tokens=8)] * 4
    got = {}
    for fused, threads, arrival in ((False, 2, "now"), (True, 1, "now"), (True, 3, "now"),
                                    (True, 3, "slow"), (True, 3, "ready"), (True, 2, "copies")):
        monkeypatch.setattr(PendingSample, "ready", (lambda self: next(flip) % 2 == 0 and
                                                     real_ready(self)) if arrival == "ready"
                            else real_ready)
        monkeypatch.setattr(PendingSample, "host_tokens",
                            slow_tokens if arrival == "slow" else real_tokens)
        eng = Engine(str(llama_dir), page_size=4, kv_cache_tokens=4096, overlap_schedule=overlap)
        grammars = eng.core.scheduler.results.grammars
        assert grammars is not None
        grammars.fused, grammars.fill_threads = fused, threads
        grammars.wait_for_tokens = arrival != "ready"
        grammars.shard_copies = arrival == "copies"  # a grammar copy per fill thread
        outs = eng.generate(_prompts(12), params)
        assert grammars.masks.fused is fused and grammars.masks.threads == threads
        got[(fused, threads, arrival)] = [(c.token_ids, c.finish_reason) for o in outs
                                          for c in o.outputs]
        if fused:
            assert grammars.masks.stats.tasks > 0, "no grammar work ran on the fill threads"
        if fused and overlap:  # the early advance ran (in "ready", only when they were there)
            assert grammars.masks.stats.arrivals > 0, "no advance started before the tokens"
    first = got[(False, 2, "now")]
    assert all(v == first for v in got.values())
    assert sum(r == "stop" for _, r in first) >= 4


@pytest.mark.parametrize("fused", [False, True])
def test_token_outside_the_grammar_aborts(llama_dir, fused, monkeypatch):
    """A draw that ignored the mask (never happens in the engine: forced here) ends the
    request with an error naming the grammar, in both paths, the stream included."""
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=4096, overlap_schedule=True)
    results = eng.core.scheduler.results
    assert results.grammars is not None
    results.grammars.fused = fused
    real = results.sampler.draw
    monkeypatch.setattr(results.sampler, "draw", lambda logits, rows, bitmask=None:
                        real(logits, rows, None))
    out = eng.generate(_prompts(1), SamplingParams(temperature=0, max_new_tokens=10,
                                                   regex="q{3}"))[0].outputs[0]
    assert out.finish_reason == "abort" and "outside the request's regex" in (out.error or "")
    assert results.grammars.rejected_tokens == 1


def _run_steps(eng, prompts, params):
    """Generate through core.step() directly: (outputs by rid, steps taken)."""
    core = eng.core
    for i, (pr, p) in enumerate(zip(prompts, params)):
        core.add_request(f"r{i}", pr, p)
    toks: dict[tuple[str, int], list[int]] = {}
    reasons: dict[tuple[str, int], str | None] = {}
    steps = 0
    while core.has_work():
        steps += 1
        for d in core.step():
            toks.setdefault((d.rid, d.index), []).extend(d.new_token_ids)
            if d.finished:
                reasons[(d.rid, d.index)] = d.finish_reason
    return toks, reasons, steps


@pytest.mark.parametrize("overlap,kv_tokens", [(False, 4096), (True, 4096), (True, 96)])
def test_jump_forward_appends_forced_runs(llama_dir, overlap, kv_tokens, monkeypatch):
    """RADIXRT_GRAMMAR_JUMP_FORWARD=1: forced runs (the schema's keys and punctuation) are
    appended without a decode step each: every output still validates, in fewer steps, with
    n > 1, the prefix cache, streaming deltas and (tiny pool) retraction. The tokens after a
    jump may differ from a run without it: the forced text is tokenized by xgrammar's greedy
    longest match, the model might have spelled it with other tokens, and what follows is
    conditioned on those tokens, so only validity is compared, not equality."""
    schema_p = SamplingParams(temperature=0.0, max_new_tokens=80, n=2,
                              json_schema=json.dumps(SCHEMA))
    params = [schema_p, SamplingParams(temperature=0.0, max_new_tokens=8)] * 3
    results = {}
    for jump in ("0", "1"):
        monkeypatch.setenv("RADIXRT_GRAMMAR_JUMP_FORWARD", jump)
        eng = Engine(str(llama_dir), page_size=4, kv_cache_tokens=kv_tokens,
                     overlap_schedule=overlap)
        toks, reasons, steps = _run_steps(eng, _prompts(6), params)
        grammars = eng.core.scheduler.results.grammars
        for key, ids in toks.items():
            if int(key[0][1:]) % 2 == 0 and reasons[key] == "stop":  # the schema requests
                jsonschema.validate(json.loads(eng.tokenizer.decode(ids)), SCHEMA)
        results[jump] = (steps, grammars.jumps, grammars.jump_tokens, reasons)
        eng.core.check_invariants()
    (steps_off, jumps_off, _, _), (steps_on, jumps_on, jtoks, reasons_on) = \
        results["0"], results["1"]
    assert jumps_off == 0 and jumps_on > 0 and jtoks >= 2 * jumps_on
    assert steps_on < steps_off, (steps_on, steps_off)
    assert sum(r == "stop" for r in reasons_on.values()) >= 3


@pytest.mark.parametrize("fused", [False, True])
def test_abort_mid_decode_keeps_the_other_grammars_in_step(llama_dir, fused):
    """Aborting constrained requests (one sample, then a whole request) while their grammar
    work may be in flight on the fill threads: the rest finish valid, nothing leaks."""
    eng = Engine(str(llama_dir), page_size=4, kv_cache_tokens=4096, overlap_schedule=True)
    core = eng.core
    grammars = core.scheduler.results.grammars
    assert grammars is not None
    grammars.fused = fused
    p = SamplingParams(temperature=1.0, seed=5, max_new_tokens=60, n=2,
                       json_schema=json.dumps(SCHEMA))
    for i, pr in enumerate(_prompts(6)):
        core.add_request(f"r{i}", pr, p)
    toks: dict[tuple[str, int], list[int]] = {}
    reasons: dict[tuple[str, int], str | None] = {}
    steps = 0
    while core.has_work():
        steps += 1
        if steps == 6:
            core.abort_request("r1", 0)
            core.abort_request("r2")
        for d in core.step():
            toks.setdefault((d.rid, d.index), []).extend(d.new_token_ids)
            if d.finished:
                reasons[(d.rid, d.index)] = d.finish_reason
    assert reasons[("r1", 0)] == reasons[("r2", 0)] == reasons[("r2", 1)] == "abort"
    for key, ids in toks.items():
        if reasons.get(key) == "stop":
            jsonschema.validate(json.loads(eng.tokenizer.decode(ids)), SCHEMA)
    assert sum(r == "stop" for r in reasons.values()) >= 3
    core.check_invariants()


def _process_engine(llama_dir, process: bool, **kw):
    eng = Engine(str(llama_dir), page_size=4, **kw)
    grammars = eng.core.scheduler.results.grammars
    assert grammars is not None
    grammars.process = process
    if process:  # served by the process from the first mask (it starts in-process otherwise)
        assert grammars.masks.wait_ready(), grammars.masks.failure
    return eng, grammars


@pytest.mark.parametrize("overlap,kv_tokens,jump", [(True, 4096, "0"), (False, 4096, "0"),
                                                    (True, 96, "0"), (True, 4096, "1")])
def test_grammar_process_gives_the_in_process_outputs(llama_dir, overlap, kv_tokens, jump,
                                                      monkeypatch):
    """RADIXRT_GRAMMAR_PROCESS: the process's masks are the in-process ones, so the same
    seeds give the same tokens (n > 1, the prefix cache, streaming through core.step, the
    tiny pool's retractions, jump-forward), every finished output valid, and the masks did
    come from the process."""
    monkeypatch.setenv("RADIXRT_GRAMMAR_JUMP_FORWARD", jump)
    schema_p = SamplingParams(temperature=1.0, seed=3, max_new_tokens=80, n=2,
                              json_schema=json.dumps(SCHEMA))
    regex_p = SamplingParams(temperature=0.7, seed=5, max_new_tokens=30, regex=REGEX)
    params = [schema_p, regex_p, SamplingParams(temperature=0.0, max_new_tokens=8)] * 3
    got = {}
    for process in (False, True):
        eng, grammars = _process_engine(llama_dir, process, kv_cache_tokens=kv_tokens,
                                        overlap_schedule=overlap)
        toks, reasons, _ = _run_steps(eng, _prompts(9), params)
        got[process] = (toks, reasons)
        for (rid, _), ids in toks.items():
            p = params[int(rid[1:])]
            if reasons[(rid, _)] == "stop" and p.json_schema is not None:
                jsonschema.validate(json.loads(eng.tokenizer.decode(ids)), SCHEMA)
            elif reasons[(rid, _)] == "stop" and p.regex is not None:
                assert re.fullmatch(REGEX, eng.tokenizer.decode(ids))
        if process:
            assert grammars.masks.failure is None and grammars.masks.stats.tasks > 0
            if overlap:
                assert grammars.masks.stats.arrivals > 0, "no advance relayed on arrival"
                assert grammars.masks.ahead_fills > 0, "no mask started ahead of the count"
        if kv_tokens < 1000:
            assert eng.stats().retractions > 0
        eng.core.check_invariants()
        grammars.close()
    assert got[True] == got[False]
    assert sum(r == "stop" for r in got[True][1].values()) >= 4


def test_killing_the_grammar_process_falls_back(llama_dir):
    """The grammar process killed mid-generation: the next masks come from the in-process
    path and the outputs are those of a run without the process."""
    import os
    import signal

    p = SamplingParams(temperature=1.0, seed=7, max_new_tokens=60, n=2,
                       json_schema=json.dumps(SCHEMA))
    got = {}
    for process in (False, True):
        eng, grammars = _process_engine(llama_dir, process, kv_cache_tokens=4096,
                                        overlap_schedule=True)
        core = eng.core
        for i, pr in enumerate(_prompts(6)):
            core.add_request(f"r{i}", pr, p)
        toks: dict[tuple[str, int], list[int]] = {}
        reasons: dict[tuple[str, int], str | None] = {}
        steps = 0
        while core.has_work():
            steps += 1
            if process and steps == 8:
                os.kill(grammars.masks.pid, signal.SIGKILL)
            for d in core.step():
                toks.setdefault((d.rid, d.index), []).extend(d.new_token_ids)
                if d.finished:
                    reasons[(d.rid, d.index)] = d.finish_reason
        for key, ids in toks.items():
            if reasons[key] == "stop":
                jsonschema.validate(json.loads(eng.tokenizer.decode(ids)), SCHEMA)
        if process:
            assert grammars.masks.failure is not None, "the kill went unnoticed"
        got[process] = (toks, reasons)
        grammars.close()
    assert got[True] == got[False]


def test_grammar_process_ends_with_its_engine(llama_dir):
    """An engine dropped without a close still takes its grammar process with it."""
    import gc

    eng, grammars = _process_engine(llama_dir, True, kv_cache_tokens=4096)
    out = eng.generate(_prompts(2), SamplingParams(temperature=0, max_new_tokens=12,
                                                   regex=REGEX))
    assert all(c.finish_reason in ("stop", "length") for o in out for c in o.outputs)
    pid = grammars.masks.pid
    del eng, grammars, out
    gc.collect()
    assert process_gone(pid), f"grammar process {pid} outlived its engine"


def test_closing_the_engine_stops_its_grammar_process(llama_dir):
    """EngineCore.close() ends the grammar process it owns (not only garbage collection)."""
    eng, grammars = _process_engine(llama_dir, True, kv_cache_tokens=4096)
    eng.generate(_prompts(1), SamplingParams(temperature=0, max_new_tokens=6, regex=REGEX))
    pid = grammars.masks.pid
    eng.core.close()
    assert process_gone(pid), f"grammar process {pid} outlived EngineCore.close()"
    eng.core.close()  # twice is fine
