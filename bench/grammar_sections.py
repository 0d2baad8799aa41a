"""The scheduler thread's time per step by part, for bench_grammar.py's engine sections: each
part's wall and thread CPU time, exclusive of the parts called inside it."""

from __future__ import annotations

import time
from typing import Any


class Sections:
    """Exclusive host time per named section of the scheduler thread: wrapped callables nest,
    and a section's time excludes the sections called inside it (launch excludes its draw,
    draw its mask fill). Wall time and the thread's CPU time (``time.thread_time``): wall far
    above CPU means the thread waited (the GIL, a lock, the device, or off its core)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per open call: [child wall, child cpu]
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        def timed(*a: Any, **kw: Any) -> Any:
            self._stack.append([0.0, 0.0])
            t, c = time.perf_counter(), time.thread_time()
            try:
                return inner(*a, **kw)
            finally:
                dt, dc = time.perf_counter() - t, time.thread_time() - c
                child, child_cpu = self._stack.pop()
                self.total[name] = self.total.get(name, 0.0) + dt - child
                self.cpu[name] = self.cpu.get(name, 0.0) + dc - child_cpu
                if self._stack:
                    self._stack[-1][0] += dt
                    self._stack[-1][1] += dc

        self._undo.append((owner, attr, inner if attr in vars(owner) else None))
        setattr(owner, attr, timed)

    def unwrap(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            if orig is not None:
                setattr(owner, attr, orig)
            else:
                delattr(owner, attr)  # the instance attribute hid the class's method
        self._undo.clear()

    def per_step(self, steps: int) -> dict[str, float]:
        return {k: v * 1e3 / steps for k, v in sorted(self.total.items())}

    def cpu_per_step(self, steps: int) -> dict[str, float]:
        return {k: v * 1e3 / steps for k, v in sorted(self.cpu.items())}


def instrument(core: Any) -> Sections:
    """Time the host side of every step's parts (see ``host_profile``)."""
    from radixrt.constrained.advance import ArrivingAdvance
    from radixrt.constrained.batch import MaskBuilder
    from radixrt.constrained.proc_masks import ProcessMasks
    from radixrt.engine import step_builder
    from radixrt.engine.sampler import PendingSample

    sched = core.scheduler
    res = sched.results
    s = Sections()
    s.wrap(core, "step", "other (step loop, aborts, polls)")
    s.wrap(sched, "_plan_continuation", "plan")
    s.wrap(sched, "_schedule", "plan")
    s.wrap(step_builder, "build", "build")
    s.wrap(sched.runner, "forward", "forward (launch)")
    if getattr(sched.runner, "graphs", None) is not None:
        # Nonzero in a mode only if its decode steps replay CUDA graphs.
        s.wrap(sched.runner.graphs, "run", "forward (graph replay)")
    s.wrap(res, "launch", "launch (kv, forks, rows)")
    s.wrap(res, "complete", "complete (stop rules, deltas)")
    s.wrap(res, "draw", "deferred draw (live rows)")
    s.wrap(res.sampler, "draw", "draw (sampler)")
    s.wrap(PendingSample, "resolve", "resolve (token read)")
    if res.grammars is not None:
        # Fused: "grammar check + sync" is the scheduler thread's share (mask-bit check of the
        # tokens, matcher sync); the advance itself runs on the fill threads (fill_thread_ms).
        s.wrap(res.grammars, "advance_and_start", "grammar check + sync")
        # Early advance: submit before the tokens land; the verdicts once they are read.
        s.wrap(res.grammars, "advance_on_arrival", "grammar check + sync")
        s.wrap(ArrivingAdvance, "settle", "grammar check + sync")
        s.wrap(res.grammars, "accept_batch", "grammar advance")  # unfused: on this thread
        s.wrap(res.grammars, "start_bitmask", "mask rows (matcher sync)")
        s.wrap(MaskBuilder, "start", "mask start")
        s.wrap(MaskBuilder, "advance_and_start", "mask start")
        # The grammar process's client: its share is queueing ops (the process does the rest).
        s.wrap(ProcessMasks, "start", "mask start")
        s.wrap(ProcessMasks, "advance_and_start", "mask start")
        # Waiting for the fill thread (what of the fill did not hide) + the H2D copy.
        s.wrap(res.grammars, "finish_bitmask", "mask wait + H2D")
    return s
