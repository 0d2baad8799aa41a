"""The in-process engine: ``Engine(model).generate(prompts, SamplingParams(...))``.

Runs EngineCore's scheduler loop in the caller's thread and turns token deltas into text with
incremental detokenization and stop strings (the same pieces the server's router uses).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from radixrt.config import EngineConfig
from radixrt.engine.core import EngineCore
from radixrt.engine.outputs import EngineStats, SequenceDelta
from radixrt.sampling_params import SamplingParams
from radixrt.server.stop_regex import StopRegexMatcher
from radixrt.text.detokenizer import IncrementalDetokenizer

Prompt = str | list[int]
Messages = list[dict[str, str]]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None


@dataclass
class RequestOutput:
    rid: str
    prompt_token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    outputs: list[CompletionOutput]
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None

    # The first (often only) sample, for convenience.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[float] | None:
        return self.outputs[0].logprobs

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass
class StreamChunk:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cached_tokens: int


class _Tracker:
    """Turns one request's deltas into its RequestOutput (text, stop strings, logprobs)."""

    def __init__(self, engine: Engine, rid: str, prompt_ids: list[int], params: SamplingParams):
        self.rid, self.params = rid, params
        self.out = RequestOutput(rid, prompt_ids, len(prompt_ids), 0,
                                 [CompletionOutput(i) for i in range(params.n)])
        self.detoks = [engine._detokenizer(params) for _ in range(params.n)]
        self.stop_res = [StopRegexMatcher(params.stop_regex) for _ in range(params.n)] \
            if params.stop_regex and engine.tokenizer is not None else []
        self.engine = engine

    def feed(self, d: SequenceDelta) -> StreamChunk | None:
        o = self.out.outputs[d.index]
        if o.finish_reason is not None:
            return None  # already ended here (a stop string); late deltas are ignored
        self.out.cached_tokens = d.cached_tokens
        if d.prompt_logprobs is not None:
            self.out.prompt_logprobs = d.prompt_logprobs
            self.out.prompt_top_logprobs = d.prompt_top_logprobs
        o.token_ids.extend(d.new_token_ids)
        if d.new_logprobs is not None:
            o.logprobs = (o.logprobs or []) + d.new_logprobs
        if d.new_top_logprobs is not None:
            o.top_logprobs = (o.top_logprobs or []) + d.new_top_logprobs
        text = ""
        detok = self.detoks[d.index]
        if detok is not None:
            step = detok.add(d.new_token_ids)
            text = step.text
            hit = self.stop_res[d.index].feed(text) if self.stop_res and not step.stopped \
                else None
            if hit is not None:  # kept whole; the request's other samples go on
                text += detok.flush()
                o.finish_reason, o.matched_stop = "stop", hit
                self.engine.core.abort_request(self.rid, d.index)
            elif step.stopped:
                o.finish_reason, o.matched_stop = "stop", step.matched_stop
                if self.params.no_stop_trim and step.matched_stop is not None:
                    text += step.matched_stop
                self.engine.core.abort_request(self.rid, d.index)
            elif d.finished:
                if self.params.no_stop_trim and d.matched_stop_token is not None:
                    text += detok.add([d.matched_stop_token]).text
                text += detok.flush()
            o.text += text
        if o.finish_reason is None and d.finished:
            o.finish_reason, o.error = d.finish_reason, d.error
            if d.matched_stop_token is not None:
                o.matched_stop = d.matched_stop_token
        return StreamChunk(d.index, text, d.new_token_ids, o.finish_reason, d.cached_tokens)


class Engine:
    """In-process generation. Keyword arguments are EngineConfig fields."""

    def __init__(self, model: str | None = None, **config: Any) -> None:
        self.config = EngineConfig(model=model, **config)
        self.core = EngineCore(self.config)
        self.tokenizer = self.core.tokenizer
        self._ids = itertools.count()

    # ---- inputs ------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids, not text")
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return list(prompt)

    def apply_chat_template(self, messages: Messages) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text)

    def _detokenizer(self, params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(
            self.tokenizer, skip_special_tokens=params.skip_special_tokens, stop=params.stop
        )

    # ---- generation --------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cache_salt: str | None = None,
        progress: bool | None = None,
    ) -> list[RequestOutput]:
        """Generate for text prompts or token-id lists; outputs come back in input order."""
        batch: list[Prompt] = (
            [prompts] if isinstance(prompts, str) or _is_ids(prompts) else list(prompts)  # type: ignore[list-item,arg-type]
        )
        params = _broadcast(sampling_params, len(batch))
        trackers = self._submit([self.encode(p) for p in batch], params, cache_salt)
        bar = tqdm(total=len(trackers), disable=not (progress if progress is not None else len(batch) >= 64),
                   desc="generate", unit="req")
        by_rid = {t.rid: t for t in trackers}
        done = 0
        while self.core.has_work():
            for d in self.core.step():
                if d.rid in by_rid:
                    by_rid[d.rid].feed(d)
            now = sum(t.out.finished for t in trackers)
            bar.update(now - done)
            done = now
        bar.close()
        return [t.out for t in trackers]

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        **kwargs: Any,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [self.apply_chat_template(m) for m in conversations]  # type: ignore[arg-type]
        return self.generate(ids, sampling_params, **kwargs)

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, *,
        cache_salt: str | None = None,
    ) -> Iterator[StreamChunk]:
        """Yield text/token increments of one request as they are generated."""
        (tracker,) = self._submit([self.encode(prompt)], _broadcast(sampling_params, 1), cache_salt)
        try:
            while not tracker.out.finished and self.core.has_work():
                for d in self.core.step():
                    if d.rid == tracker.rid and (chunk := tracker.feed(d)) is not None:
                        yield chunk
        finally:
            if not tracker.out.finished:
                self.core.abort_request(tracker.rid)
                while self.core.has_work():
                    self.core.step()

    def _submit(
        self, ids: list[list[int]], params: list[SamplingParams], cache_salt: str | None
    ) -> list[_Tracker]:
        trackers = []
        for prompt_ids, p in zip(ids, params):
            if p.stop_regex and self.tokenizer is None:
                raise ValueError("stop_regex is matched on text: this model has no tokenizer")
            rid = f"req-{next(self._ids)}"
            self.core.add_request(rid, prompt_ids, p, cache_salt)
            trackers.append(_Tracker(self, rid, prompt_ids, p))
        return trackers

    # ---- introspection -----------------------------------------------------------------
    def stats(self) -> EngineStats:
        return self.core.stats()

    def flush_cache(self) -> bool:
        return self.core.flush_cache()

    def check_invariants(self) -> None:
        self.core.check_invariants()


def _is_ids(x: object) -> bool:
    return isinstance(x, list) and (not x or isinstance(x[0], int))


def _broadcast(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return list(params)
