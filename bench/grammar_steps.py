"""The engine-level halves of bench_grammar.py: decode steps of B requests all constrained vs
none, on a GPU (``gpu``) or on the CPU with a stub forward (``host``), with the scheduler
thread's time per step by part (wall and CPU), the fill threads' time, and a sweep over the
grammar path (fused / unfused) and fill thread counts (``--grammar-configs``).
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time
import warnings
from typing import Any

import torch
from grammar_sections import Sections, instrument

from radixrt.constrained.batch import SWITCH_ENV
from radixrt.constrained.proc_masks import NICE_ENV

# Forces a long output (for the decode-step comparison: every sequence keeps decoding).
LONG = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}},
        "required": ["text"], "additionalProperties": False}

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_decode(core: Any, mode: str, batch: int, steps: int, device: str,
               temperature: float, sections: Sections | None = None,
               profile: bool = False) -> dict[str, Any]:
    """Admit ``batch`` tiny-prompt requests (all JSON-schema-constrained or none), decode a few
    warm-up steps, then time ``steps`` steps; every request must keep decoding throughout."""
    from radixrt import SamplingParams

    kw: dict[str, Any] = {"json_schema": json.dumps(LONG)} if mode == "json_schema" else \
        {"ignore_eos": True}
    p = SamplingParams(temperature=temperature, max_new_tokens=steps + 40, **kw)
    for i in range(batch):
        core.add_request(f"{mode}{i}", [100 + i % 50, 200 + i % 100, 300], p)
    while any(s.in_prefill for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    for _ in range(5):  # warm-up (graphs, first masks)
        core.step()
    assert len(core.scheduler.running) == batch, "every request must still be decoding"
    before = core.scheduler.overlapped_steps
    syncs: list[warnings.WarningMessage] = []
    prof = cProfile.Profile() if profile else None
    if sections is not None:
        sections.total.clear()
        sections.cpu.clear()
    g = core.scheduler.results.grammars
    st0 = g._masks.stats if g is not None and g._masks is not None else None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device == "cuda" and mode == "json_schema":
            torch.cuda.set_sync_debug_mode("warn")  # every host<->device sync warns
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        for _ in range(steps):
            core.step()
        if prof is not None:
            prof.disable()
        _sync(device)
        step_ms = (time.perf_counter() - t) * 1e3 / steps
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(core.scheduler.running) == batch, "a request ended inside the timed steps"
    out: dict[str, Any] = {"step_ms": step_ms,
                           "overlapped": core.scheduler.overlapped_steps - before}
    if sections is not None:
        out["host_ms"] = sections.per_step(steps)
        out["host_cpu_ms"] = sections.cpu_per_step(steps)
    grammars = core.scheduler.results.grammars
    if mode == "json_schema" and grammars is not None and grammars.tokenizer is not None:
        # The advance walks each drawn token character by character: its cost follows the
        # tokens' length (a sample of the outputs so far).
        ids = [t for seq in core.scheduler.running for t in seq.output_ids][:5000]
        out["mean_token_chars"] = sum(len(grammars.tokenizer.decode([t])) for t in ids) / \
            max(1, len(ids))
    if mode == "json_schema" and grammars is not None and grammars._masks is not None:
        st, masks = grammars._masks.stats, grammars._masks
        out["fill_path"] = "proc" if masks.lazy else "fused" if masks.fused else "unfused"
        if masks.lazy:
            out["process_failure"] = masks.failure
        out["fill_threads"] = masks.threads
        if masks.fused:  # summed over the fill threads; they run beside the scheduler thread
            def per_step(f: str, scale: float = 1e3) -> float:
                return (getattr(st, f) - (getattr(st0, f) if st0 is not None else 0)) \
                    * scale / steps

            out["fill_thread_ms"] = {"advance": per_step("accept_s"), "fill": per_step("fill_s"),
                                     "cpu": per_step("cpu_s"),
                                     # waiting for the tokens to land (early advances)
                                     "arrival_wait": per_step("arrival_s"),
                                     "early_per_step": per_step("arrivals", 1.0)}
    if device == "cuda" and mode == "json_schema":
        # One expected per step: reading the step's tokens (the event wait is not counted).
        out["syncs"] = len(syncs)
        out["sync_sites"] = sorted({f"{w.filename}:{w.lineno}" for w in syncs})[:10]
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out["profile"] = buf.getvalue()
    for i in range(batch):
        core.abort_request(f"{mode}{i}")
    while core.has_work():
        core.step()
    return out


# (fused, fill threads (None: the default), Python's GIL switch interval in ms (None: as is),
# whether the fused path's early advance waits for the tokens (False: "fused-ready", the
# advance starts early only when they are on the host already), whether each fill thread's
# matchers use their own copy of the grammar ("fused-copies", RADIXRT_GRAMMAR_SHARD_COPIES),
# whether the grammar process does the work ("proc", RADIXRT_GRAMMAR_PROCESS; threads: its
# xgrammar fill threads), its niceness (None: the default, 0; "proc-nice10": 10,
# RADIXRT_GRAMMAR_PROCESS_NICE), and whether a step's masks start at its launch ("proc-late":
# only once the tokens ahead are counted, RADIXRT_GRAMMAR_FILL_AHEAD=0))
Config = tuple[bool, int | None, float | None, bool, bool, bool, int | None, bool]
DEFAULT_CONFIGS = "fused:default"
_SWITCH_INTERVAL_S = sys.getswitchinterval()
# path -> (fused, wait for tokens, grammar copies, grammar process, its niceness, fill ahead)
_PATHS: dict[str, tuple[bool, bool, bool, bool, int | None, bool]] = {
    "fused": (True, True, False, False, None, True),
    "fused-ready": (True, False, False, False, None, True),
    "fused-copies": (True, True, True, False, None, True),
    "unfused": (False, True, False, False, None, True),
    "proc": (True, True, False, True, None, True),
    "proc-nice10": (True, True, False, True, 10, True),
    "proc-late": (True, True, False, True, None, False)}


def parse_configs(text: str) -> list[Config]:
    """``fused:2,unfused:default,fused:4@0.5,fused-ready:default,proc:4...`` -> [(True, 2,
    None, True, False, False, None, True), (False, None, None, True, False, False, None,
    True), ...];
    ``@ms`` sets
    RADIXRT_GRAMMAR_SWITCH_INTERVAL_MS for that run (how long a fill thread may wait for the
    GIL behind the scheduler thread's Python; CPython's default is 5, the fused path's 0.5;
    unfused and proc runs leave Python's as it is)."""
    out: list[Config] = []
    for part in text.split(","):
        spec, _, switch = part.strip().partition("@")
        path, _, threads = spec.partition(":")
        if path not in _PATHS or not (threads == "default" or threads.isdigit()) \
                or (switch and not switch.replace(".", "", 1).isdigit()):
            raise SystemExit(f"bad grammar config {part!r}: want "
                             f"{'|'.join(_PATHS)}:N|default[@ms]")
        fused, wait, copies, proc, nice, ahead = _PATHS[path]
        out.append((fused, None if threads == "default" else int(threads),
                    float(switch) if switch else None, wait, copies, proc, nice, ahead))
    return out


def config_label(c: Config) -> str:
    path = next(k for k, v in _PATHS.items() if v[0] == c[0] and (not c[0] or v[1:] == c[3:]))
    return f"{path}:{c[1] or 'default'}" + (f"@{c[2]:g}" if c[2] is not None else "")


def use_config(grammars: Any, config: Config) -> None:
    """Switch the engine's grammar path / fill threads (a new MaskBuilder at the next mask),
    the early advance's policy and the GIL switch interval."""
    if grammars._masks is not None:
        grammars._masks.drain()
        grammars._masks.close()
        grammars._masks = None
    grammars.fused, grammars.fill_threads = config[0], config[1]
    grammars.wait_for_tokens, grammars.shard_copies = config[3], config[4]
    grammars.process, grammars.fill_ahead = config[5], config[7]
    # "@ms" through the engine's own knob (the fused MaskBuilder sets it); none: its default.
    sys.setswitchinterval(_SWITCH_INTERVAL_S)
    if config[2] is not None:
        os.environ[SWITCH_ENV] = f"{config[2]:g}"
    else:
        os.environ.pop(SWITCH_ENV, None)
    if config[6] is not None:
        os.environ[NICE_ENV] = str(config[6])
    else:
        os.environ.pop(NICE_ENV, None)
    if config[5] and grammars.tokenizer is not None:  # up before the timed steps
        assert grammars.masks.wait_ready(), f"grammar process: {grammars.masks.failure}"


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median step time (the lower middle for an even count), with every
    run's step time in ``step_ms_runs``."""
    mid = sorted(runs, key=lambda r: r["step_ms"])[(len(runs) - 1) // 2]
    return {**mid, "step_ms_runs": [r["step_ms"] for r in runs]}


def run_configs(core: Any, configs: list[Config], batch: int, steps: int, device: str,
                temperature: float, sections: Sections, profile: bool = False,
                repeats: int = 1) -> dict[str, Any]:
    """Unconstrained first, then ``repeats`` rounds of every config followed by an
    unconstrained run. The first run of a process pays one-time costs (a first run on the
    H200 measured 15.4 ms against 8.7 warm) and the host's speed drifts between runs (two runs
    of one config on the H200 measured 13.7 and 20.6 ms), so a config's step time is the
    median of its rounds, and the ratios divide by the median of the unconstrained runs
    after the first (one round: the faster of the first and the last)."""
    grammars = core.scheduler.results.grammars

    def done(label: str, r: dict[str, Any]) -> dict[str, Any]:
        # As each run ends: a run cut short by a timeout still leaves the earlier ones.
        print(f"run {label}: {r['step_ms']:.2f} ms/step", flush=True)
        return r

    def unconstrained(label: str) -> dict[str, Any]:
        return done(label, run_decode(core, "unconstrained", batch, steps, device, temperature,
                                      sections))

    first = unconstrained("unconstrained (first)")
    by_label: dict[str, list[dict[str, Any]]] = {}
    later: list[dict[str, Any]] = []
    for k in range(repeats):
        for c in configs:
            use_config(grammars, c)
            by_label.setdefault(config_label(c), []).append(done(config_label(c), run_decode(
                core, "json_schema", batch, steps, device, temperature, sections, profile)))
            profile = False  # the first config only
        later.append(unconstrained(f"unconstrained (after round {k + 1})"))
    base = _median_run(later) if repeats > 1 else min(first, later[0],
                                                      key=lambda r: r["step_ms"])
    runs = {label: _median_run(rs) for label, rs in by_label.items()}
    for r in runs.values():
        r["ratio"] = r["step_ms"] / base["step_ms"]
        r["ratio_of_fastest"] = min(r["step_ms_runs"]) / min(x["step_ms"] for x in later)
    # "unconstrained" is the baseline the ratios use; every run is kept.
    out: dict[str, Any] = {"unconstrained": base, "unconstrained_first": first,
                           "unconstrained_last": later[-1],
                           "unconstrained_runs": [first["step_ms"]] +
                           [r["step_ms"] for r in later], "configs": runs}
    out["json_schema"] = next(iter(runs.values()))  # the first config (older reports read it)
    return out


def bench_host(tok: Any, batch: int, steps: int, temperature: float, profile: bool,
               configs: list[Config], repeats: int = 1) -> dict[str, Any]:
    """The host's cost of a decode step, on the CPU: an engine whose forward returns fixed
    random logits over the tokenizer's vocabulary at once (llama-tiny's KV and page tables,
    the real scheduler, sampler and grammars), B requests all constrained vs none. The
    sampler's tensor work runs on the CPU here (it is device work on a GPU): "draw" includes
    it, the other sections are host work a GPU step pays too."""
    from radixrt import Engine
    from radixrt.constrained.sequences import SequenceGrammars

    vocab = len(tok)
    eng = Engine("llama-tiny", load_format="dummy", device="cpu", page_size=16,
                 max_running_requests=batch, kv_cache_tokens=batch * (steps + 80),
                 overlap_schedule=True)
    core = eng.core
    core.scheduler.results.grammars = SequenceGrammars(
        tok, vocab, "cpu", core.model_info.eos_token_ids)
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))

    def forward(fb: Any) -> torch.Tensor:
        n = int(fb.logits_indices.shape[0])
        return logits[:n] if n <= batch else torch.randn(n, vocab)

    core.scheduler.runner.forward = forward  # type: ignore[method-assign,assignment]
    sections = instrument(core)
    out: dict[str, Any] = {"batch": batch, "steps": steps, "vocab": vocab,
                           "temperature": temperature}
    out.update(run_configs(core, configs, batch, steps, "cpu", temperature, sections, profile,
                           repeats))
    sections.unwrap()
    return out


def bench_gpu(tok: Any, preset: str, batch: int, steps: int, device: str,
              configs: list[Config], repeats: int = 1) -> dict[str, Any]:
    from radixrt import Engine, SamplingParams
    from radixrt.constrained.sequences import SequenceGrammars

    out: dict[str, Any] = {"preset": preset, "batch": batch, "steps": steps, "device": device}
    extra: dict[str, Any] = {"mem_fraction": 0.80} if device == "cuda" else {
        "kv_cache_tokens": batch * (steps + 64)}
    eng = Engine(preset, load_format="dummy", device=device,
                 dtype="bfloat16" if device == "cuda" else "float32", page_size=16,
                 max_running_requests=batch, **extra)
    core = eng.core
    vocab = core.args.vocab_size
    grammars = SequenceGrammars(tok, vocab, device, core.model_info.eos_token_ids)
    core.scheduler.results.grammars = grammars  # dummy weights carry no tokenizer
    t = time.perf_counter()
    grammars.check(SamplingParams(json_schema=json.dumps(LONG)))
    out["compile_ms"] = (time.perf_counter() - t) * 1e3
    sections = instrument(core)
    out.update(run_configs(core, configs, batch, steps, device, 0.7, sections,
                           repeats=repeats))
    sections.unwrap()
    for r in out["configs"].values():
        r["mask_fill_ms"] = sum(v for k, v in r["host_ms"].items() if k.startswith("mask"))
    out["ratio"] = out["json_schema"]["ratio"]
    out["overlapped_steps"] = core.stats().extra.get("overlapped_steps")
    out["cuda_graphs"] = core.scheduler.runner.graphs is not None
    return out


def print_host(title: str, r: dict[str, Any]) -> None:
    """Per config: step time and ratio, then the scheduler thread's ms per step by part as
    wall/cpu, and the fill threads' advance + fill ms (summed over threads)."""
    u, runs = r["unconstrained"], r["configs"]
    first, last = r.get("unconstrained_first", u), r.get("unconstrained_last", u)
    every = " ".join(f"{x:.2f}" for x in r.get("unconstrained_runs", []))
    print(f"{title}: unconstrained {first['step_ms']:.2f} ms/step first, "
          f"{last['step_ms']:.2f} last (all runs: {every}; ratios against {u['step_ms']:.2f}; "
          f"overlapped {u['overlapped']})")
    for label, c in runs.items():
        if len(c.get("step_ms_runs", [])) > 1:
            print(f"  json_schema {label:20s} runs " +
                  " ".join(f"{x:.2f}" for x in c["step_ms_runs"]) +
                  f" ms/step: median ratio {c['ratio']:.3f}, fastest/fastest "
                  f"{c['ratio_of_fastest']:.3f}")
    for label, c in runs.items():
        fill = c.get("fill_thread_ms")
        extra = f", fill threads: advance {fill['advance']:.2f} + fill {fill['fill']:.2f} ms " \
            f"(cpu {fill['cpu']:.2f}), waited for tokens {fill.get('arrival_wait', 0):.2f} ms " \
            f"({fill.get('early_per_step', 0):.1f} early tasks/step)" if fill else ""
        if "mean_token_chars" in c:
            extra += f", drawn tokens {c['mean_token_chars']:.1f} chars"
        print(f"  json_schema {label:16s} {c['step_ms']:7.2f} ms/step  ratio {c['ratio']:.3f} "
              f"(overlapped {c['overlapped']}){extra}")
    # The baseline's breakdown (the warmer unconstrained run).
    cols = ["none", *runs]
    print(f"  {'host ms/step wall/cpu':30s} " + " ".join(f"{k:>15s}" for k in cols))
    keys = sorted(set(u["host_ms"]).union(*(set(c["host_ms"]) for c in runs.values())))
    for k in keys + ["sum"]:
        cells = []
        for c in [u, *runs.values()]:
            w, cpu = c["host_ms"], c["host_cpu_ms"]
            pair = (sum(w.values()), sum(cpu.values())) if k == "sum" else \
                (w.get(k, 0.0), cpu.get(k, 0.0))
            cells.append(f"{pair[0]:7.2f}/{pair[1]:<7.2f}")
        print(f"  {k:30s} " + " ".join(f"{x:>15s}" for x in cells))
    for label, c in runs.items():
        if "syncs" in c:
            print(f"  syncs in the timed constrained steps ({label}): {c['syncs']} "
                  f"{c['sync_sites']}")
