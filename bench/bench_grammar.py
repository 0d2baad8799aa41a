"""Structured-generation costs (issue 14).

Sections (``--sections``, comma-separated):
  compile  grammar compilation per schema/regex/EBNF, cold vs cached (our per-text cache)
  masks    CPU mask computation per step for a batch of B JSON-schema-constrained sequences
           (fill the [B, V/32] bitmask from B matchers, advance each by one allowed token),
           plus the bitmask apply on the CPU
  libs     xgrammar vs llguidance (if importable): mask + advance per token, one sequence
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
import json
import statistics
import sys
import time
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
    fill_s: list[float] = []
    inner = grammars.bitmask

    def timed(*a: Any) -> Any:
        t0 = time.perf_counter()
        r = inner(*a)
        fill_s.append(time.perf_counter() - t0)
        return r

    grammars.bitmask = timed  # type: ignore[method-assign]
    for mode in ("unconstrained", "json_schema"):
        kw: dict[str, Any] = {"json_schema": json.dumps(LONG)} if mode == "json_schema" else \
            {"ignore_eos": True}
        p = SamplingParams(temperature=0.7, max_new_tokens=steps + 40, **kw)
        for i in range(batch):
            core.add_request(f"{mode}{i}", [100 + i % 50, 200 + i, 300], p)
        while any(s.in_prefill for s in core.scheduler.running) or core.scheduler.waiting:
            core.step()
        for _ in range(5):  # warm-up (graphs, first masks)
            core.step()
        assert len(core.scheduler.running) == batch, "every request must still be decoding"
        fill_s.clear()
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            core.step()
        _sync(device)
        step_ms = (time.perf_counter() - t) * 1e3 / steps
        assert len(core.scheduler.running) == batch, "a request ended inside the timed steps"
        out[mode] = {"step_ms": step_ms,
                     "mask_fill_ms": statistics.mean(fill_s) * 1e3 if fill_s else 0.0}
        for i in range(batch):
            core.abort_request(f"{mode}{i}")
        while core.has_work():
            core.step()
    out["ratio"] = out["json_schema"]["step_ms"] / out["unconstrained"]["step_ms"]
    out["overlapped_steps"] = core.stats().extra.get("overlapped_steps")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="compile,masks,libs")
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default model's)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--device", default="cuda", help="gpu section: cpu only for a dry run")
    ap.add_argument("--out", default="bench/results/grammar")
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
              f"(mask fill {r['json_schema']['mask_fill_ms']:.2f} ms), ratio {r['ratio']:.3f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grammar.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
