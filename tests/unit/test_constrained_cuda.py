"""The grammar masks on CUDA (a separate file: no hypothesis needed on the GPU box)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from radixrt.constrained.batch import MaskBuilder
from radixrt.constrained.grammar import GrammarCompiler, tokenizer_info
from radixrt.constrained.matcher import Matcher
from tests.fixtures.tiny_models import TINY_VOCAB, build_tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="module")
def compiler(tok: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer_info(tok, TINY_VOCAB), timeout_s=60)


@pytest.mark.gpu
@pytest.mark.parametrize("process", [False, True])
def test_cuda_masks_equal_the_host_fill(compiler: GrammarCompiler, tok: Any,
                                        process: bool) -> None:
    """On CUDA the mask reaches the device through a side stream: each step's device mask
    equals the host fill, with the compute stream busy when the copy is queued and the two
    ring buffers reused (so a refill waits for the copy that read it)."""
    from radixrt.constrained.proc_masks import ProcessMasks

    cg = compiler.compile(("json_schema", json.dumps({"type": "object"})))
    builder: MaskBuilder | ProcessMasks = MaskBuilder(TINY_VOCAB, "cuda")
    if process:  # the grammar process: its shared ring is page-locked (a real async copy)
        builder = ProcessMasks(TINY_VOCAB, "cuda", compiler.info, threads=2)
        assert builder.wait_ready(), builder.failure
    ms = [Matcher(cg, lazy=builder.lazy) for _ in range(10)]
    busy = torch.randn(2048, 2048, device="cuda")
    words = (TINY_VOCAB + 31) // 32
    got = []
    for step, t in enumerate(tok.encode('{"ab": 12}', add_special_tokens=False)):
        rows: list[Matcher | None] = [m if i % 3 != step % 3 else None for i, m in enumerate(ms)]
        ref = torch.full((10, words), -1, dtype=torch.int32)
        for i, m in enumerate(rows):
            if m is not None:
                m.fill(ref, i)
        _ = busy @ busy  # the compute stream is still working when the copy is queued
        mask = builder.fill(rows)
        assert mask is not None
        got.append((mask.clone(), ref))  # cloned on the compute stream, after the copy
        for m in ms:
            assert m.advance(t)
    torch.cuda.synchronize()
    for step, (mask, ref) in enumerate(got):
        assert torch.equal(mask.cpu(), ref), f"step {step}: the device mask differs"
    if isinstance(builder, ProcessMasks):
        ring = [b for b in builder._ring if b is not None]
        assert ring and all(b.registered and b.host.is_pinned() for b in ring)
        assert builder.failure is None and builder.stats.tasks > 0
        builder.close()


@pytest.mark.gpu
def test_cuda_engine_early_advance_keeps_outputs_valid(tiny_model_dir: Any) -> None:
    """On CUDA with overlap the fill threads advance each step's grammars as its tokens land
    (waiting on the device while the next step is planned): every output matches its regex,
    the same as with the advance started only for tokens already on the host, and some
    advances did start early."""
    import re

    from radixrt import Engine, SamplingParams

    regex = r"(red|green|blue)-[0-9]{2}"
    prompts = [list(range(10, 40)) + [60 + i] for i in range(12)]
    params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=24, regex=regex)
    got = {}
    for wait, process in ((True, False), (False, False), (True, True)):
        eng = Engine(str(tiny_model_dir("llama")), device="cuda", dtype="float32", page_size=16,
                     kv_cache_tokens=4096, overlap_schedule=True)
        grammars = eng.core.scheduler.results.grammars
        assert grammars is not None
        grammars.fill_threads, grammars.wait_for_tokens = 3, wait
        grammars.process = process  # the grammar process (the default on CUDA)
        if process:
            assert grammars.masks.wait_ready(), grammars.masks.failure
        outs = eng.generate(prompts, params)
        got[(wait, process)] = [o.outputs[0].token_ids for o in outs]
        assert all(o.outputs[0].finish_reason == "stop" for o in outs)
        for o in outs:
            assert re.fullmatch(regex, eng.tokenizer.decode(o.outputs[0].token_ids))
        if wait:
            assert grammars.masks.stats.arrivals > 0, "no advance started before its tokens"
        if process:
            assert grammars.masks.failure is None and grammars.masks.stats.tasks > 0
        grammars.close()
    assert got[(True, False)] == got[(False, False)] == got[(True, True)]
