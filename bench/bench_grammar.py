"""Structured-generation costs (issue 14).

Sections (``--sections``, comma-separated):
  compile  grammar compilation per schema/regex/EBNF, cold vs cached (our per-text cache)
  masks    CPU mask computation per step for a batch of B JSON-schema-constrained sequences
           (fill the [B, V/32] bitmask from B matchers, advance each by one allowed token),
           plus the bitmask apply on the CPU
  libs     xgrammar vs llguidance (if importable): mask + advance per token, one sequence
  host     the host's ms per decode step, by part (plan, build, launch, complete, grammar
           advance, mask fill, draw, ...), B requests all constrained vs none, on the CPU
           with a forward that returns random logits at once (``--profile``: cProfile)
  gpu      decode step time on a dummy-weight model shape (default llama3-8b) with B requests
           all JSON-schema-constrained vs unconstrained, same engine (``--device cpu
           --preset llama-tiny`` is a dry run)

The tokenizer (``--tokenizer``, default: the default model's) sets the vocabulary the masks
are computed over; the ``gpu`` section pads it to the model's vocabulary. Results: JSON under
``--out`` and a markdown summary on stdout.

    .venv/bin/python bench/bench_grammar.py --sections compile,masks,libs
    python3 bench/bench_grammar.py --sections gpu --tokenizer DIR --out $OUT   (on a GPU)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radixrt.constrained.batch import MaskBuilder  # noqa: E402
from radixrt.constrained.grammar import GrammarCompiler, tokenizer_info  # noqa: E402
from radixrt.constrained.matcher import Matcher  # noqa: E402
from radixrt.kernels.token_bitmask import apply_token_bitmask  # noqa: E402

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "id": {"type": "integer"}, "items": {"type": "array", "items": {
        "type": "object", "properties": {"sku": {"type": "string", "maxLength": 12},
                                         "qty": {"type": "integer", "minimum": 1},
                                         "price": {"type": "number"}},
        "required": ["sku", "qty", "price"], "additionalProperties": False}},
    "status": {"enum": ["open", "paid", "shipped"]},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "zip": {"type": "string",
                                                         "pattern": "[0-9]{5}"}},
                "required": ["city", "zip"]}},
    "required": ["id", "items", "status", "address"], "additionalProperties": False}
# Forces a long output (for the decode-step comparison: every sequence keeps decoding).
LONG = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}},
        "required": ["text"], "additionalProperties": False}
GRAMMARS = {
    "json_person": ("json_schema", json.dumps(PERSON)),
    "json_nested": ("json_schema", json.dumps(NESTED)),
    "json_object": ("json_schema", json.dumps({"type": "object"})),
    "regex_date": ("regex", r"[0-9]{4}-[0-9]{2}-[0-9]{2}( [0-9]{2}:[0-9]{2})?"),
    "ebnf_list": ("ebnf", 'root ::= "[" item ("," item)* "]"\nitem ::= [a-z]+ | [0-9]+'),
}


def load_tokenizer(path: str | None) -> Any:
    from transformers import AutoTokenizer

    if path is None:
        from radixrt.models.default import default_model_path

        path = str(default_model_path())
    return AutoTokenizer.from_pretrained(path)


def bench_compile(tok: Any, vocab: int) -> dict[str, Any]:
    info = tokenizer_info(tok, vocab)
    out: dict[str, Any] = {}
    for name, key in GRAMMARS.items():
        comp = GrammarCompiler(info, timeout_s=120)  # a fresh cache: the first is cold
        t = time.perf_counter()
        comp.compile(key)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(100):
            comp.compile(key)
        cached = (time.perf_counter() - t) / 100
        out[name] = {"cold_ms": cold * 1e3, "cached_us": cached * 1e6}
        comp.close()
    return out


def bench_masks(tok: Any, vocab: int, batch: int, steps: int) -> dict[str, Any]:
    comp = GrammarCompiler(tokenizer_info(tok, vocab), timeout_s=120)
    cg = comp.compile(GRAMMARS["json_nested"])
    matchers = [Matcher(cg) for _ in range(batch)]
    builder = MaskBuilder(vocab, "cpu")
    gen = torch.Generator().manual_seed(0)
    fill_s, adv_s, apply_s = [], [], []
    for _ in range(steps):
        live: list[Matcher | None] = [m if not m.is_terminated else None for m in matchers]
        t = time.perf_counter()
        mask = builder.fill(live)
        fill_s.append(time.perf_counter() - t)
        assert mask is not None
        logits = torch.randn(batch, vocab, generator=gen)
        t = time.perf_counter()
        apply_token_bitmask(logits, mask)
        apply_s.append(time.perf_counter() - t)
        picks = logits.argmax(-1).tolist()
        t = time.perf_counter()
        for i, m in enumerate(matchers):
            if m.is_terminated:
                matchers[i] = m = Matcher(cg)  # keep the batch full: a new document starts
            if not m.advance(picks[i]):
                matchers[i] = Matcher(cg)
        adv_s.append(time.perf_counter() - t)

    def ms(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs[2:])  # the first steps warm the caches
        return {"mean_ms": statistics.mean(xs) * 1e3, "p50_ms": xs[len(xs) // 2] * 1e3,
                "p99_ms": xs[int(len(xs) * 0.99)] * 1e3}

    return {"batch": batch, "vocab": vocab, "steps": steps, "fill": ms(fill_s),
            "advance": ms(adv_s), "apply_cpu": ms(apply_s)}


def bench_libs(tok: Any, vocab: int) -> dict[str, Any]:
    import xgrammar as xgr

    doc = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines"],
                      "ok": True})
    ids = tok.encode(doc, add_special_tokens=False)
    out: dict[str, Any] = {"tokens": len(ids)}
    info = tokenizer_info(tok, vocab)
    comp = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    t = time.perf_counter()
    cg = comp.compile_json_schema(json.dumps(PERSON))
    out["xgrammar_compile_ms"] = (time.perf_counter() - t) * 1e3
    m = xgr.GrammarMatcher(cg)
    bm = xgr.allocate_token_bitmask(1, vocab)
    t = time.perf_counter()
    for i in ids:
        m.fill_next_token_bitmask(bm)
        assert m.accept_token(i)
    out["xgrammar_us_per_token"] = (time.perf_counter() - t) / len(ids) * 1e6
    try:
        import llguidance
        import llguidance.hf
        import llguidance.numpy as lnp
    except ImportError:
        out["llguidance"] = "not installed"
        return out
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    t = time.perf_counter()
    lm = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(PERSON)))
    out["llguidance_create_ms"] = (time.perf_counter() - t) * 1e3
    mask = lnp.allocate_token_bitmask(1, lt.vocab_size)
    t = time.perf_counter()
    for i in ids:
        lnp.fill_next_token_bitmask(lm, mask, 0)
        assert lm.consume_token(i), lm.get_error()
    out["llguidance_us_per_token"] = (time.perf_counter() - t) / len(ids) * 1e6
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Sections:
    """Exclusive host time per named section: wrapped callables nest, and a section's time
    excludes the sections called inside it (launch excludes its draw, draw its mask fill)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per open call: [child time]
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        def timed(*a: Any, **kw: Any) -> Any:
            self._stack.append([0.0])
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                dt = time.perf_counter() - t
                child = self._stack.pop()[0]
                self.total[name] = self.total.get(name, 0.0) + dt - child
                if self._stack:
                    self._stack[-1][0] += dt

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


def instrument(core: Any) -> Sections:
    """Time the host side of every step's parts (see ``host_profile``)."""
    from radixrt.constrained.batch import MaskBuilder
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
        s.wrap(res.grammars, "accept_batch", "grammar advance")
        s.wrap(res.grammars, "start_bitmask", "mask rows (matcher sync)")
        s.wrap(MaskBuilder, "start", "mask start")
        # Waiting for the fill thread (what of the fill did not hide) + the H2D copy.
        s.wrap(res.grammars, "finish_bitmask", "mask wait + H2D")
    return s


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


def bench_host(tok: Any, batch: int, steps: int, temperature: float,
               profile: bool) -> dict[str, Any]:
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
    for mode in ("unconstrained", "json_schema"):
        out[mode] = run_decode(core, mode, batch, steps, "cpu", temperature, sections,
                               profile and mode == "json_schema")
    sections.unwrap()
    return out


def bench_gpu(tok: Any, preset: str, batch: int, steps: int, device: str) -> dict[str, Any]:
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
    for mode in ("unconstrained", "json_schema"):
        r = out[mode] = run_decode(core, mode, batch, steps, device, 0.7, sections)
        r["mask_fill_ms"] = sum(v for k, v in r["host_ms"].items() if k.startswith("mask"))
    sections.unwrap()
    out["ratio"] = out["json_schema"]["step_ms"] / out["unconstrained"]["step_ms"]
    out["overlapped_steps"] = core.stats().extra.get("overlapped_steps")
    graphs = core.scheduler.runner.graphs
    out["cuda_graphs"] = graphs is not None
    return out


def print_host(title: str, r: dict[str, Any]) -> None:
    u, c = r["unconstrained"], r["json_schema"]
    print(f"{title}: step {u['step_ms']:.2f} ms unconstrained, {c['step_ms']:.2f} ms json_schema "
          f"(overlapped {u['overlapped']}/{c['overlapped']} steps)")
    print(f"  {'host ms/step':32s} {'unconstr':>9s} {'json':>9s}")
    for k in sorted(set(u["host_ms"]) | set(c["host_ms"])):
        print(f"  {k:32s} {u['host_ms'].get(k, 0.0):9.3f} {c['host_ms'].get(k, 0.0):9.3f}")
    print(f"  {'sum':32s} {sum(u['host_ms'].values()):9.3f} {sum(c['host_ms'].values()):9.3f}")
    if "syncs" in c:
        print(f"  syncs in the timed constrained steps: {c['syncs']} {c['sync_sites']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="compile,masks,libs")
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default model's)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--device", default="cuda", help="gpu section: cpu only for a dry run")
    ap.add_argument("--out", default="bench/results/grammar")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="host section: 0 keeps the CPU's share of the draw small")
    ap.add_argument("--profile", action="store_true", help="host section: cProfile top 25")
    a = ap.parse_args()
    torch.set_num_threads(2)
    tok = load_tokenizer(a.tokenizer)
    vocab = len(tok)
    res: dict[str, Any] = {"tokenizer": a.tokenizer or "default model", "vocab": vocab}
    sections = a.sections.split(",")
    if "compile" in sections:
        res["compile"] = bench_compile(tok, vocab)
        for k, v in res["compile"].items():
            print(f"compile {k:12s} cold {v['cold_ms']:8.2f} ms   cached {v['cached_us']:6.2f} us")
    if "masks" in sections:
        r = res["masks"] = bench_masks(tok, vocab, a.batch, a.steps)
        print(f"masks B={r['batch']} V={r['vocab']}: fill {r['fill']['mean_ms']:.2f} ms "
              f"(p99 {r['fill']['p99_ms']:.2f}), advance {r['advance']['mean_ms']:.2f} ms, "
              f"CPU apply {r['apply_cpu']['mean_ms']:.2f} ms per step")
    if "libs" in sections:
        r = res["libs"] = bench_libs(tok, vocab)
        print("libs", json.dumps(r))
    if "gpu" in sections:
        r = res["gpu"] = bench_gpu(tok, a.preset, a.batch, a.steps, a.device)
        print(f"gpu {r['preset']} B={r['batch']}: unconstrained {r['unconstrained']['step_ms']:.2f}"
              f" ms/step, json_schema {r['json_schema']['step_ms']:.2f} ms/step "
              f"(mask fill {r['json_schema']['mask_fill_ms']:.2f} ms), ratio {r['ratio']:.3f}, "
              f"cuda graphs {r['cuda_graphs']}")
        print_host(f"gpu host breakdown {r['preset']} B={r['batch']}", r)
    if "host" in sections:
        r = res["host"] = bench_host(tok, a.batch, a.steps, a.temperature, a.profile)
        print_host(f"host (cpu, stub forward) B={r['batch']} V={r['vocab']}", r)
        if "profile" in r["json_schema"]:
            print(r["json_schema"].pop("profile"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grammar.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
