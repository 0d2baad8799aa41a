"""The grammar process (radixrt/constrained/proc_masks.py, grammar_proc.py): its masks equal
the in-process fill over random walks with rollbacks, forks and frees; it starts behind the
in-process path and falls back to it when killed; nothing outlives ``close`` or its parent."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixrt.constrained.grammar import GrammarCompiler, tokenizer_info
from radixrt.constrained.matcher import Matcher
from radixrt.constrained.proc_masks import ProcessMasks
from radixrt.constrained.sequences import PROCESS_ENV, use_process
from tests.fixtures.processes import process_gone
from tests.fixtures.tiny_models import TINY_VOCAB, build_tokenizer

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "n", "tags"], "additionalProperties": False}
GRAMMARS = [("json_schema", json.dumps(SCHEMA)), ("regex", r"(red|green|blue)-[0-9]{2}"),
            ("ebnf", 'root ::= "[" item ("," item)* "]"\nitem ::= [a-z]+ | [0-9]+')]


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler(tokenizer_info(build_tokenizer(), TINY_VOCAB), timeout_s=60)


@pytest.fixture(scope="module")
def masks(compiler: GrammarCompiler) -> Any:
    pm = ProcessMasks(TINY_VOCAB, "cpu", compiler.info, threads=2)
    assert pm.wait_ready(), pm.failure
    yield pm
    pm.close()


def _reference(rows: list[Matcher | None]) -> torch.Tensor:
    ref = torch.full((len(rows), (TINY_VOCAB + 31) // 32), -1, dtype=torch.int32)
    for i, m in enumerate(rows):
        if m is not None and not m.done:
            m.fill(ref, i)
    return ref


def _allowed(row: torch.Tensor) -> list[int]:
    bits = row.numpy()
    return [t for t in range(TINY_VOCAB) if (int(bits[t >> 5]) >> (t & 31)) & 1]


# Per step and row: what happens to it (advance by the k-th allowed token, roll back, fork a
# new row from it, drop it, or a fresh matcher in its place).
ACTIONS = st.lists(st.lists(st.tuples(st.sampled_from(["adv", "adv", "adv", "back", "fork",
                                                        "free", "new", "skip"]),
                                       st.integers(0, 10**6)), min_size=6, max_size=6),
                   min_size=4, max_size=10)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=ACTIONS, early=st.booleans())
def test_process_masks_equal_the_in_process_fill(compiler: GrammarCompiler, masks: Any,
                                                 actions: list[list[tuple[str, int]]],
                                                 early: bool) -> None:
    """Lazy matchers filled by the process and eager twins filled here give equal masks at
    every step, whatever mix of advances (counted directly, or sent ahead as on arrival),
    rollbacks, forks, frees and new matchers the walk takes."""
    cgs = [compiler.compile(k) for k in GRAMMARS]
    lazy: list[Matcher | None] = [Matcher(cgs[i % 3], lazy=True) for i in range(6)]
    eager: list[Matcher | None] = [Matcher(cgs[i % 3]) for i in range(6)]
    for step in actions:
        got = masks.fill(lazy)
        ref = _reference(eager)
        if got is None:
            assert all(m is None or m.done for m in eager)
        else:
            assert torch.equal(got, ref), "the process's mask differs"
        tokens = [0] * len(lazy)
        pairs = []
        forked: set[int] = set()  # rows replaced by a fork this step (their mask is stale)
        for i, (what, k) in enumerate(step):
            a, b = lazy[i], eager[i]
            if i in forked:
                continue
            if what == "new" or a is None or b is None:
                lazy[i], eager[i] = Matcher(cgs[k % 3], lazy=True), Matcher(cgs[k % 3])
            elif what == "free":
                lazy[i] = eager[i] = None
            elif what == "back" and b.num_accepted:
                n = 1 + k % b.num_accepted
                a.rollback(n)
                b.rollback(n)
            elif what == "fork":
                j = (i + 1) % 6
                lazy[j], eager[j] = a.fork(), b.fork()
                forked.add(j)
            elif what == "adv" and not b.done:
                allowed = _allowed(ref[i])
                tokens[i] = allowed[k % len(allowed)]
                assert b.advance(tokens[i])
                pairs.append((a, i))
        if early and pairs:  # sent on "arrival" before they are counted, as the engine does
            drawn = np.array(tokens)
            masks.advance_on_arrival(pairs, lambda drawn=drawn: drawn)
        for a, i in pairs:
            a._record(tokens[i], True)
        gc.collect()  # dropped matchers free their copies in the process
    assert masks.failure is None and masks.stats.tasks > 0


def test_starts_in_process_then_serves_and_survives_a_kill(compiler: GrammarCompiler) -> None:
    """Before the process is up, masks come from the in-process path; once it is, from the
    process; kill it and the next masks come from here again, equal all along."""
    cg = compiler.compile(GRAMMARS[0])
    pm = ProcessMasks(TINY_VOCAB, "cpu", compiler.info, threads=1)
    lazy = [Matcher(cg, lazy=True) for _ in range(12)]
    eager = [Matcher(cg) for _ in range(12)]
    phases = []
    for step in range(30):
        if step == 10:
            assert pm.wait_ready(), pm.failure
        if step == 20:
            os.kill(pm.pid, 9)
        pending = pm.start(lazy)
        phases.append(pending is not None and pending.ticket > 0)
        got, ref = pm.finish(pending), _reference(list(eager))
        assert got is not None and torch.equal(got, ref), f"step {step}"
        for i, (a, b) in enumerate(zip(lazy, eager)):
            if not b.done:
                allowed = _allowed(ref[i])
                t = allowed[step % len(allowed)]
                assert b.advance(t)
                a._record(t, True)
    assert phases[10:20] == [True] * 10 and not any(phases[21:]), phases
    assert pm.failure is not None
    pm.close()


def test_a_stuck_process_is_given_up_after_the_reply_timeout(
        compiler: GrammarCompiler, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that stops answering (SIGSTOP) costs one reply timeout, then the mask is
    filled here, equal to the in-process one, and the process is gone."""
    import signal

    from radixrt.constrained import proc_masks

    monkeypatch.setattr(proc_masks, "REPLY_TIMEOUT_S", 0.5)
    cg = compiler.compile(GRAMMARS[0])
    pm = ProcessMasks(TINY_VOCAB, "cpu", compiler.info, threads=1)
    assert pm.wait_ready(), pm.failure
    lazy, eager = [Matcher(cg, lazy=True) for _ in range(5)], [Matcher(cg) for _ in range(5)]
    first = pm.fill(lazy)
    assert first is not None and torch.equal(first, _reference(list(eager)))
    for a, b in zip(lazy, eager):
        t = _allowed(_reference([b])[0])[0]
        assert b.advance(t)
        a._record(t, True)
    pid = pm.pid
    os.kill(pid, signal.SIGSTOP)
    got = pm.fill(lazy)
    assert got is not None and torch.equal(got, _reference(list(eager)))
    assert pm.failure is not None and "no answer" in pm.failure
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    pm.close()


def test_close_leaves_no_process_or_shared_memory(compiler: GrammarCompiler) -> None:
    def memfds() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                n += "radixrt-grammar-mask" in os.readlink(f"/proc/self/fd/{fd}")
        with open("/proc/self/maps") as f:
            return n + f.read().count("radixrt-grammar-mask")

    cg = compiler.compile(GRAMMARS[1])
    before = memfds()  # other tests' instances may be alive
    pm = ProcessMasks(TINY_VOCAB, "cpu", compiler.info, threads=1)
    assert pm.wait_ready(), pm.failure
    mask = pm.fill([Matcher(cg, lazy=True) for _ in range(4)])
    assert mask is not None and memfds() > before
    pid = pm.pid
    del mask
    pm.close()
    pm.close()  # twice is fine
    gc.collect()
    assert memfds() == before
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and reaped


def test_the_process_exits_with_its_parent(tmp_path: Any) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys\n"
        "from radixrt.constrained.grammar import GrammarCompiler, tokenizer_info\n"
        "from radixrt.constrained.proc_masks import ProcessMasks\n"
        "from tests.fixtures.tiny_models import TINY_VOCAB, build_tokenizer\n"
        "info = tokenizer_info(build_tokenizer(), TINY_VOCAB)\n"
        "pm = ProcessMasks(TINY_VOCAB, 'cpu', info, threads=1)\n"
        "assert pm.wait_ready()\n"
        "print(pm.pid, flush=True)\n"
        "os._exit(0)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=root, env=dict(os.environ, PYTHONPATH=root), timeout=120)
    pid = int(out.stdout.split()[-1])
    assert process_gone(pid), f"grammar process {pid} outlived its parent"


def test_env_selects_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROCESS_ENV, raising=False)
    # auto: off everywhere (in-process fill measured faster on the H200, bench/RESULTS.md)
    assert not use_process("cuda") and not use_process("cpu")
    monkeypatch.setenv(PROCESS_ENV, "1")
    assert use_process("cpu") and use_process("cuda")
    monkeypatch.setenv(PROCESS_ENV, "0")
    assert not use_process("cuda")
    monkeypatch.setenv(PROCESS_ENV, "sometimes")
    with pytest.raises(ValueError, match=PROCESS_ENV):
        use_process("cpu")


def test_masks_started_ahead_of_the_count(compiler: GrammarCompiler, masks: Any) -> None:
    """``start_ahead``: the next mask is started while the step's tokens are still on their
    way (relayed on arrival, not counted yet); the process fills from its copies once they
    have them, a row whose token was a stop token allowing everything."""
    from tests.fixtures.tiny_models import EOS_ID

    cg = compiler.compile(GRAMMARS[1])
    lazy = [Matcher(cg, lazy=True) for _ in range(8)]
    eager = [Matcher(cg) for _ in range(8)]
    ref = _reference(list(eager))
    got = masks.fill(lazy)
    assert got is not None and torch.equal(got, ref)
    aheads = masks.ahead_fills
    for step in range(12):
        tokens, pairs = [0] * 8, []
        for i, b in enumerate(eager):
            if b.done:
                continue
            allowed = _allowed(ref[i])
            tokens[i] = EOS_ID if EOS_ID in allowed and i % 2 else allowed[(i + step) % len(allowed)]
            assert b.advance(tokens[i])
            pairs.append((lazy[i], i))
        if not pairs:
            break
        drawn = np.array(tokens)
        masks.advance_on_arrival(pairs, lambda drawn=drawn: drawn)
        live = {i for _, i in pairs}
        started, pending = masks.start_ahead([lazy[i] if i in live else None for i in range(8)],
                                             [i in live for i in range(8)])
        assert started
        got = masks.finish(pending)
        for _, i in pairs:  # the caller counts them now (ArrivingAdvance.settle)
            lazy[i]._record(tokens[i], True)
        ref = _reference([b if i in live else None for i, b in enumerate(eager)])
        assert got is None or torch.equal(got, ref), f"step {step}"
    assert masks.ahead_fills > aheads and masks.failure is None
    assert any(b.terminated for b in eager), "no row ended on a stop token"
