"""Benchmark workloads as token ids: deterministic (seeded), no downloads, no tokenizer.

Every workload is a tuple of conversations; a conversation is a sequence of turns run one after
the other. A single-shot request is a one-turn conversation. Turn t's prompt is the whole history
(what chat clients send)::

    prompt(t) = in_0 + out_0 + in_1 + out_1 + ... + in_t        (out_k: what the model generated)

so a driver builds prompts from real outputs, and the cache can reuse them.

Token ids are drawn from the lower 90% of the vocabulary: special tokens (BOS/EOS, chat markers)
sit at the top of Llama 3 and Qwen vocabularies, and benchmark prompts should not contain them.

Scaling: ``scale`` multiplies the number of requests (groups, conversations, documents'
questions, sequences); ``len_scale`` multiplies every token length. Both keep the workload's shape
(sharing structure) so CPU smoke runs exercise the same code paths as full runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WORKLOADS = ("gsp", "chat", "rag", "fewshot", "random")
VOCAB_FRACTION = 0.9
MIN_TOKEN_ID = 3  # skip the ids tiny test vocabularies use for specials


@dataclass(frozen=True)
class Turn:
    input_ids: tuple[int, ...]  # tokens this turn appends (the whole prompt for one-shot requests)
    max_new_tokens: int

    def __post_init__(self) -> None:
        assert self.input_ids, "a turn needs at least one input token"
        assert self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]

    def __post_init__(self) -> None:
        assert self.turns, "a conversation needs at least one turn"


@dataclass(frozen=True)
class Workload:
    name: str
    conversations: tuple[Conversation, ...]
    params: Mapping[str, Any] = field(default_factory=dict)  # generator arguments, for the record

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    @property
    def multi_turn(self) -> bool:
        return any(len(c.turns) > 1 for c in self.conversations)

    def max_output_tokens(self) -> int:
        return sum(t.max_new_tokens for c in self.conversations for t in c.turns)


class _Tokens:
    """Seeded source of random token ids in [MIN_TOKEN_ID, 0.9 * vocab)."""

    def __init__(self, vocab_size: int, rng: np.random.Generator) -> None:
        self.hi = int(vocab_size * VOCAB_FRACTION)
        assert self.hi > MIN_TOKEN_ID + 1, f"vocab_size {vocab_size} too small for workloads"
        self.rng = rng

    def __call__(self, n: int) -> tuple[int, ...]:
        assert n >= 1, f"need at least one token, got {n}"
        return tuple(int(t) for t in self.rng.integers(MIN_TOKEN_ID, self.hi, size=n))

    def length(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))


def _n(x: float) -> int:
    return max(1, round(x))


def gsp(
    vocab_size: int, seed: int = 0, *, num_groups: int = 64, prompts_per_group: int = 16,
    system_len: int = 2048, question_len: int = 128, output_len: int = 256,
) -> Workload:
    """Generated shared prefix (SGLang bench_serving's gsp): groups share a system prompt."""
    rng = np.random.default_rng(seed)
    tok = _Tokens(vocab_size, rng)
    convs = []
    for _ in range(num_groups):
        system = tok(system_len)
        for _ in range(prompts_per_group):
            convs.append(Conversation((Turn(system + tok(question_len), output_len),)))
    order = rng.permutation(len(convs))
    params = dict(num_groups=num_groups, prompts_per_group=prompts_per_group,
                  system_len=system_len, question_len=question_len, output_len=output_len)
    return Workload("gsp", tuple(convs[i] for i in order), params)


def chat(
    vocab_size: int, seed: int = 0, *, num_conversations: int = 32, num_turns: int = 8,
    input_range: tuple[int, int] = (256, 512), output: str = "short",
    output_range: tuple[int, int] | None = None,
) -> Workload:
    """Multi-turn chat: each turn sends the whole history plus a new user message."""
    ranges = {"short": (4, 8), "long": (256, 512)}
    assert output in ranges, f"chat output must be 'short' or 'long', got {output!r}"
    out_lo, out_hi = output_range or ranges[output]
    tok = _Tokens(vocab_size, np.random.default_rng(seed))
    convs = tuple(
        Conversation(tuple(
            Turn(tok(tok.length(*input_range)), tok.length(out_lo, out_hi))
            for _ in range(num_turns)
        ))
        for _ in range(num_conversations)
    )
    params = dict(num_conversations=num_conversations, num_turns=num_turns,
                  input_range=list(input_range), output_range=[out_lo, out_hi])
    return Workload("chat", convs, params)


def rag(
    vocab_size: int, seed: int = 0, *, num_docs: int = 32, doc_len: int = 1024,
    num_questions: int = 512, zipf_s: float = 1.1, instruction_len: int = 64,
    question_len: int = 64, output_len: int = 128,
) -> Workload:
    """Document reuse: prompt = instruction + document + question; documents drawn by Zipf."""
    rng = np.random.default_rng(seed)
    tok = _Tokens(vocab_size, rng)
    instruction = tok(instruction_len)
    docs = [tok(doc_len) for _ in range(num_docs)]
    weights = 1.0 / np.arange(1, num_docs + 1, dtype=np.float64) ** zipf_s
    picks = rng.choice(num_docs, size=num_questions, p=weights / weights.sum())
    convs = tuple(
        Conversation((Turn(instruction + docs[int(d)] + tok(question_len), output_len),))
        for d in picks
    )
    params = dict(num_docs=num_docs, doc_len=doc_len, num_questions=num_questions, zipf_s=zipf_s,
                  instruction_len=instruction_len, question_len=question_len,
                  output_len=output_len)
    return Workload("rag", convs, params)


def fewshot(
    vocab_size: int, seed: int = 0, *, num_shots: int = 5, shot_len: int = 160,
    num_questions: int = 1024, question_range: tuple[int, int] = (64, 192), output_len: int = 8,
) -> Workload:
    """MMLU 5-shot shape: one fixed k-shot header, then many different questions."""
    tok = _Tokens(vocab_size, np.random.default_rng(seed))
    header = tok(num_shots * shot_len)
    convs = tuple(
        Conversation((Turn(header + tok(tok.length(*question_range)), output_len),))
        for _ in range(num_questions)
    )
    params = dict(num_shots=num_shots, shot_len=shot_len, num_questions=num_questions,
                  question_range=list(question_range), output_len=output_len)
    return Workload("fewshot", convs, params)


def random(
    vocab_size: int, seed: int = 0, *, num_seqs: int = 256,
    input_range: tuple[int, int] = (100, 1024), output_range: tuple[int, int] = (100, 1024),
) -> Workload:
    """nano-vllm's offline throughput set: independent random prompts, nothing shared."""
    tok = _Tokens(vocab_size, np.random.default_rng(seed))
    convs = tuple(
        Conversation((Turn(tok(tok.length(*input_range)), tok.length(*output_range)),))
        for _ in range(num_seqs)
    )
    params = dict(num_seqs=num_seqs, input_range=list(input_range),
                  output_range=list(output_range))
    return Workload("random", convs, params)


def _scaled_range(r: tuple[int, int], s: float) -> tuple[int, int]:
    return (_n(r[0] * s), max(_n(r[0] * s), _n(r[1] * s)))


# name -> (generator, count fields, length fields, length-range fields)
_SCALING: dict[str, tuple[Callable[..., Workload], tuple[str, ...], tuple[str, ...],
                          tuple[str, ...]]] = {
    "gsp": (gsp, ("num_groups",), ("system_len", "question_len", "output_len"), ()),
    "chat": (chat, ("num_conversations",), (), ("input_range",)),
    "rag": (rag, ("num_questions", "num_docs"),
            ("doc_len", "instruction_len", "question_len", "output_len"), ()),
    "fewshot": (fewshot, ("num_questions",), ("shot_len", "output_len"), ("question_range",)),
    "random": (random, ("num_seqs",), (), ("input_range", "output_range")),
}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "gsp": dict(num_groups=64, system_len=2048, question_len=128, output_len=256),
    "chat": dict(num_conversations=32, input_range=(256, 512)),
    "rag": dict(num_questions=512, num_docs=32, doc_len=1024, instruction_len=64,
                question_len=64, output_len=128),
    "fewshot": dict(num_questions=1024, shot_len=160, output_len=8, question_range=(64, 192)),
    "random": dict(num_seqs=256, input_range=(100, 1024), output_range=(100, 1024)),
}


def make_workload(
    name: str, vocab_size: int, *, seed: int = 0, scale: float = 1.0, len_scale: float = 1.0,
    **overrides: Any,
) -> Workload:
    """Build workload ``name`` at defaults times ``scale`` (counts) and ``len_scale`` (lengths).

    ``overrides`` set generator arguments directly (after scaling), e.g. ``output="long"``.
    """
    if name not in _SCALING:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    assert scale > 0 and len_scale > 0, f"scales must be positive, got {scale}, {len_scale}"
    fn, counts, lengths, ranges = _SCALING[name]
    kw: dict[str, Any] = {}
    defaults = _DEFAULTS[name]
    for k in counts:
        kw[k] = _n(defaults[k] * scale)
    for k in lengths:
        kw[k] = _n(defaults[k] * len_scale)
    for k in ranges:
        kw[k] = _scaled_range(defaults[k], len_scale)
    if name == "chat" and overrides.get("output") == "long":
        kw["output_range"] = _scaled_range((256, 512), len_scale)
    kw.update(overrides)
    return fn(vocab_size, seed, **kw)


def expected_stream(workload: Workload) -> list[tuple[list[int], int]]:
    """(prompt, output length) per request, in turn-major order, before anything runs.

    Outputs are not known yet; placeholder outputs of distinct negative ids stand in for them
    (so they never match a prompt token by accident), which is exact for the sharing structure.
    """
    histories: list[list[int]] = [[] for _ in workload.conversations]
    out: list[tuple[list[int], int]] = []
    fresh = -1
    max_turns = max(len(c.turns) for c in workload.conversations)
    for t in range(max_turns):
        for ci, conv in enumerate(workload.conversations):
            if t >= len(conv.turns):
                continue
            turn = conv.turns[t]
            prompt = histories[ci] + list(turn.input_ids)
            out.append((prompt, turn.max_new_tokens))
            output = list(range(fresh, fresh - turn.max_new_tokens, -1))
            fresh -= turn.max_new_tokens
            histories[ci] = prompt + output
    return out


class Histories:
    """Each conversation's history, so drivers can build turn t's prompt from real outputs.

    A turn whose prompt plus output would not fit ``max_context`` ends its conversation (the
    driver counts it as dropped) instead of failing the run.
    """

    def __init__(self, workload: Workload, max_context: int | None = None) -> None:
        self.workload = workload
        self.max_context = max_context
        self._hist: list[list[int]] = [[] for _ in workload.conversations]

    def prompt(self, conv: int, turn: int) -> list[int] | None:
        t = self.workload.conversations[conv].turns[turn]
        prompt = self._hist[conv] + list(t.input_ids)
        if self.max_context is not None and len(prompt) + t.max_new_tokens > self.max_context:
            return None
        return prompt

    def finish(self, conv: int, prompt: list[int], output: list[int]) -> None:
        self._hist[conv] = prompt + output

    def has_turn(self, conv: int, turn: int) -> bool:
        return turn < len(self.workload.conversations[conv].turns)
