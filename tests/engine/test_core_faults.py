"""EngineCore.step_isolating_faults (the worker's step): an exception in a step fails the
requests it held and the engine serves on with every page accounted for; a device fault is
re-raised (the worker must be replaced). The in-process ``step`` lets every error through."""

from __future__ import annotations

from typing import Any

import pytest

from radixrt.config import EngineConfig
from radixrt.engine.core import EngineCore, is_device_fault
from radixrt.sampling_params import SamplingParams


@pytest.fixture
def core(tiny_model_dir: Any) -> EngineCore:
    return EngineCore(EngineConfig(model=str(tiny_model_dir("llama")), page_size=16,
                                   kv_cache_tokens=2048, debug_invariants=True))


def run_to_end(core: EngineCore) -> dict[str, Any]:
    last: dict[str, Any] = {}
    while core.has_work():
        for d in core.step():
            if d.finished:
                last[d.rid] = d
    return last


def fail_next_forward(core: EngineCore, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    real = core.runner.forward
    calls = {"n": 0}

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(core.runner, "forward", forward)


def test_failed_step_fails_its_requests_and_the_engine_serves_on(
        core: EngineCore, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    core.add_request("a", list(range(1, 40)), params)
    core.add_request("b", list(range(5, 30)), SamplingParams(max_new_tokens=8, n=2, seed=3))
    fail_next_forward(core, monkeypatch, ValueError("bad sampling state"))
    deltas = core.step_isolating_faults()
    done = {d.rid for d in deltas if d.finished}
    assert done == {"a", "b"}
    for d in deltas:
        assert d.finish_reason == "abort"
        assert d.error is not None and "ValueError: bad sampling state" in d.error
    assert not core.has_work()
    core.check_invariants()
    s = core.stats()
    assert s.locked_pages == 0 and s.private_pages == 0
    core.add_request("c", list(range(1, 40)), params)
    last = run_to_end(core)
    assert last["c"].finish_reason == "length" and last["c"].completion_tokens == 8


def test_device_fault_is_reraised(core: EngineCore, monkeypatch: pytest.MonkeyPatch) -> None:
    core.add_request("a", [1, 2, 3], SamplingParams(max_new_tokens=4))
    fail_next_forward(core, monkeypatch,
                      RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        core.step_isolating_faults()


def test_in_process_step_lets_errors_through(core: EngineCore,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    core.add_request("a", [1, 2, 3], SamplingParams(max_new_tokens=4))
    fail_next_forward(core, monkeypatch, ValueError("bad sampling state"))
    with pytest.raises(ValueError, match="bad sampling state"):
        core.step()


def test_device_fault_classification() -> None:
    assert is_device_fault(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_device_fault(RuntimeError("shape mismatch"))
    assert not is_device_fault(OverflowError("CUDA error"))  # only RuntimeErrors carry it
