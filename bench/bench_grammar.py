"""Structured-generation costs (issue 14).

Sections (``--sections``, comma-separated):
  compile  grammar compilation per schema/regex/EBNF, cold vs cached (our per-text cache)
  masks    CPU grammar work per step for a batch of B JSON-schema-constrained sequences
           (advance B matchers by one allowed token each, fill the [B, V/32] bitmask), per
           grammar config: the caller's wall time, and the fill threads' advance / fill time
           (fused); plus the bitmask apply on the CPU
  libs     xgrammar vs llguidance (if importable): mask + advance per token, one sequence
  host     the host's ms per decode step, by part (plan, build, launch, complete, grammar
           advance, mask fill, draw, ...), B requests all constrained vs none, on the CPU
           with a forward that returns random logits at once (``--profile``: cProfile)
  jump     jump-forward off vs on (RADIXRT_GRAMMAR_JUMP_FORWARD) on the default model: engine
           steps, forced tokens, wall time, outputs that parse, outputs equal to "off"
  gpu      decode step time on a dummy-weight model shape (default llama3-8b) with B requests
           all JSON-schema-constrained vs unconstrained, same engine (``--device cpu
           --preset llama-tiny`` is a dry run)

``--grammar-configs`` (masks, host, gpu): grammar paths to sweep, e.g.
``fused:1,fused:2,fused:4,fused:default,unfused:default,proc:default`` (see
radixrt/constrained/batch.py; ``proc``: the grammar process, radixrt/constrained/proc_masks.py).

The tokenizer (``--tokenizer``, default: the default model's) sets the vocabulary the masks
are computed over; the ``gpu`` section pads it to the model's vocabulary. Results: JSON under
``--out`` and a markdown summary on stdout.

    .venv/bin/python bench/bench_grammar.py --sections compile,masks,libs
    python3 bench/bench_grammar.py --sections gpu --tokenizer DIR --out $OUT   (on a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
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
from radixrt.constrained.proc_masks import NICE_ENV, ProcessMasks  # noqa: E402
from radixrt.kernels.token_bitmask import apply_token_bitmask  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grammar_steps import (  # noqa: E402
    DEFAULT_CONFIGS,
    LONG,
    Config,
    bench_gpu,
    bench_host,
    config_label,
    parse_configs,
    print_host,
)

__all__ = ["LONG", "load_tokenizer"]  # profile_grammar.py imports them from here

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


def bench_masks(tok: Any, vocab: int, batch: int, steps: int,
                configs: list[Config]) -> dict[str, Any]:
    comp = GrammarCompiler(tokenizer_info(tok, vocab), timeout_s=120)
    cg = comp.compile(GRAMMARS["json_nested"])
    out: dict[str, Any] = {"batch": batch, "vocab": vocab, "steps": steps, "configs": {}}

    def ms(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs[2:])  # the first steps warm the caches
        return {"mean_ms": statistics.mean(xs) * 1e3, "p50_ms": xs[len(xs) // 2] * 1e3,
                "p99_ms": xs[int(len(xs) * 0.99)] * 1e3}

    for c in configs:
        fused, threads, proc = c[0], c[1], c[5]
        if c[6] is not None:  # proc-nice10
            os.environ[NICE_ENV] = str(c[6])
        else:
            os.environ.pop(NICE_ENV, None)
        builder: MaskBuilder | ProcessMasks = ProcessMasks(vocab, "cpu", comp.info, threads) \
            if proc else MaskBuilder(vocab, "cpu", threads, fused)
        if isinstance(builder, ProcessMasks):
            assert builder.wait_ready(), builder.failure
        matchers = [Matcher(cg, shard=i, lazy=builder.lazy) for i in range(batch)]
        gen = torch.Generator().manual_seed(0)
        step_s, apply_s = [], []
        accepts: list[tuple[Matcher, int]] = []
        for _ in range(steps):
            rows: list[Matcher | None] = list(matchers)
            t = time.perf_counter()
            # One step's grammar work as the engine does it: advance by the last tokens, fill
            # the next mask (fused: both on the fill threads; unfused: advance here).
            if fused:
                pending = builder.advance_and_start(accepts, rows)
            else:
                for m, tk in accepts:
                    m.advance(tk)
                pending = builder.start(rows)
            mask = builder.finish(pending)
            step_s.append(time.perf_counter() - t)
            assert mask is not None
            logits = torch.randn(batch, vocab, generator=gen)
            t = time.perf_counter()
            apply_token_bitmask(logits, mask)
            apply_s.append(time.perf_counter() - t)
            picks = logits.argmax(-1).tolist()
            accepts = []
            for i, m in enumerate(matchers):
                if m.done:  # keep the batch full: a new document starts
                    matchers[i] = Matcher(cg, shard=i, lazy=builder.lazy)
                else:
                    accepts.append((m, picks[i]))
        st = builder.stats
        builder.close()
        r = out["configs"][config_label((fused, threads, None, True, False, proc, c[6], c[7]))] = {
            "threads": builder.threads, "advance_and_fill": ms(step_s), "apply_cpu": ms(apply_s)}
        if fused:
            r["fill_thread_ms"] = {"advance": st.accept_s * 1e3 / steps,
                                   "fill": st.fill_s * 1e3 / steps, "cpu": st.cpu_s * 1e3 / steps}
    return out


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


def bench_jump(tok: Any, requests: int, max_tokens: int) -> dict[str, Any]:
    """Jump-forward on the default model (CPU is fine): the same JSON-schema requests (greedy)
    with RADIXRT_GRAMMAR_JUMP_FORWARD off and on; engine steps, forced tokens appended,
    wall time, and how many outputs parse (the outputs may differ: see
    SequenceGrammars.jump_forward)."""
    import os

    from radixrt import Engine, SamplingParams
    from radixrt.constrained.sequences import JUMP_FORWARD_ENV
    from radixrt.models.default import default_model_path

    msgs = [[{"role": "user", "content": f"Describe person number {i} as JSON."}]
            for i in range(requests)]
    prompts = [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False) for m in msgs]
    p = SamplingParams(temperature=0.0, max_new_tokens=max_tokens, json_schema=json.dumps(PERSON))
    out: dict[str, Any] = {"requests": requests, "max_tokens": max_tokens}
    for jump in ("0", "1"):
        os.environ[JUMP_FORWARD_ENV] = jump
        eng = Engine(str(default_model_path()), kv_cache_tokens=requests * (max_tokens + 200))
        core, steps, texts = eng.core, 0, {}
        t = time.perf_counter()
        for i, ids in enumerate(prompts):
            core.add_request(f"j{i}", list(ids), p)
        got: dict[str, list[int]] = {}
        while core.has_work():
            steps += 1
            for d in core.step():
                got.setdefault(d.rid, []).extend(d.new_token_ids)
        wall = time.perf_counter() - t
        texts = {rid: tok.decode(ids) for rid, ids in got.items()}
        ok = 0
        for text in texts.values():
            try:
                json.loads(text)
                ok += 1
            except ValueError:
                pass
        g = core.scheduler.results.grammars
        assert g is not None, "the default model has a tokenizer"
        out["on" if jump == "1" else "off"] = {
            "steps": steps, "wall_s": wall, "tokens": sum(len(v) for v in got.values()),
            "jumps": g.jumps, "jump_tokens": g.jump_tokens, "parsed": ok,
            "same_text_as_off": None}
        out.setdefault("texts", {})[jump] = texts
    os.environ.pop(JUMP_FORWARD_ENV, None)
    t0, t1 = out.pop("texts").values()
    out["on"]["same_text_as_off"] = sum(t0[k] == t1.get(k) for k in t0)
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
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="host section: 0 keeps the CPU's share of the draw small")
    ap.add_argument("--profile", action="store_true", help="host section: cProfile top 25")
    ap.add_argument("--repeats", type=int, default=1,
                    help="host/gpu: rounds of the configs, each followed by an unconstrained run")
    ap.add_argument("--grammar-configs", default=DEFAULT_CONFIGS,
                    help="masks/host/gpu: grammar paths to sweep, e.g. fused:1,unfused:default")
    a = ap.parse_args()
    configs = parse_configs(a.grammar_configs)
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
        r = res["masks"] = bench_masks(tok, vocab, a.batch, a.steps, configs)
        for label, c in r["configs"].items():
            f = c.get("fill_thread_ms")
            split = f", fill threads: advance {f['advance']:.2f} + fill {f['fill']:.2f} ms " \
                f"(cpu {f['cpu']:.2f})" if f else ""
            print(f"masks B={r['batch']} V={r['vocab']} {label:16s} ({c['threads']} threads): "
                  f"advance + fill {c['advance_and_fill']['mean_ms']:.2f} ms "
                  f"(p99 {c['advance_and_fill']['p99_ms']:.2f}){split}, "
                  f"CPU apply {c['apply_cpu']['mean_ms']:.2f} ms per step")
    if "libs" in sections:
        r = res["libs"] = bench_libs(tok, vocab)
        print("libs", json.dumps(r))
    if "jump" in sections:
        r = res["jump"] = bench_jump(tok, 8, 96)
        for k in ("off", "on"):
            v = r[k]
            print(f"jump-forward {k:3s}: {v['steps']} steps, {v['tokens']} tokens "
                  f"({v['jump_tokens']} forced in {v['jumps']} jumps), {v['wall_s']:.2f} s, "
                  f"{v['parsed']}/{r['requests']} parse"
                  + (f", {v['same_text_as_off']} same text as off" if k == "on" else ""))
    if "gpu" in sections:
        r = res["gpu"] = bench_gpu(tok, a.preset, a.batch, a.steps, a.device, configs,
                                        a.repeats)
        print(f"gpu {r['preset']} B={r['batch']}: unconstrained {r['unconstrained']['step_ms']:.2f}"
              f" ms/step, json_schema {r['json_schema']['step_ms']:.2f} ms/step "
              f"(mask fill {r['json_schema']['mask_fill_ms']:.2f} ms), ratio {r['ratio']:.3f}, "
              f"cuda graphs {r['cuda_graphs']}")
        print_host(f"gpu host breakdown {r['preset']} B={r['batch']}", r)
    if "host" in sections:
        r = res["host"] = bench_host(tok, a.batch, a.steps, a.temperature, a.profile, configs,
                                          a.repeats)
        print_host(f"host (cpu, stub forward) B={r['batch']} V={r['vocab']}", r)
        if "profile" in r["json_schema"]:
            print(r["json_schema"].pop("profile"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grammar.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
