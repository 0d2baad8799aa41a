"""What a DSL program runs on: the ``Backend`` protocol and the in-process ``EngineBackend``.

A backend turns prompt text into generations, prompt logprobs (for ``select``) and a
cache-warming request (for ``fork``). The HTTP twin is ``RuntimeEndpoint`` (http_backend.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from radixrt.lang.chat_template import ChatTemplate
from radixrt.lang.scoring import PromptScores

if TYPE_CHECKING:
    from radixrt.engine.engine import Engine, RequestOutput
    from radixrt.sampling_params import SamplingParams


class BackendError(RuntimeError):
    """A backend (or the server behind it) refused or failed a request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message if status is None else f"server error {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class GenParams:
    """Sampling settings of one ``gen`` call, resolved against the program's defaults."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # At most one grammar (the engine refuses more): the output must match it.
    regex: str | None = None
    json_schema: str | None = None  # JSON text
    ebnf: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("regex", "json_schema", "ebnf") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of regex, json_schema, ebnf; got {given}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"max_new_tokens": self.max_tokens, "temperature": self.temperature,
                             "top_p": self.top_p, "top_k": self.top_k, "stop": list(self.stop)}
        if self.seed is not None:
            d["seed"] = self.seed
        for k in ("regex", "json_schema", "ebnf"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None


@dataclass
class GenChunk:
    """A streamed piece of text; the last chunk carries the whole result in ``done``."""

    text: str
    done: GenResult | None = None


class Backend(Protocol):
    def generate(self, prompt: str, params: GenParams) -> GenResult: ...

    def stream(self, prompt: str, params: GenParams) -> Iterator[GenChunk]: ...

    def prompt_logprobs(self, prompts: Sequence[str],
                        logprob_start_len: int = 0) -> list[PromptScores]:
        """Score each prompt's tokens at index >= ``logprob_start_len``; earlier tokens may be
        served from the prefix cache (their logprobs None). The prompts stay cached."""
        ...

    def cache_prefix(self, prompt: str) -> GenResult: ...

    def chat_template(self) -> ChatTemplate: ...


@dataclass
class _Pending:
    prompt: str
    params: SamplingParams
    future: Future[RequestOutput] = field(default_factory=Future)


class EngineBackend:
    """Runs programs on an in-process ``Engine``.

    The engine is not thread-safe, and requests only batch (and share freshly computed
    prefixes) when they reach one ``generate`` call together. So concurrent program threads
    queue their requests and whichever thread finds the engine free runs everything queued as
    one batch (leader/follower: no background thread to own or stop).
    """

    def __init__(self, engine: Engine | None = None, model: str | None = None,
                 **engine_config: Any) -> None:
        if engine is None:
            from radixrt.engine.engine import Engine

            engine = Engine(model, **engine_config)
        elif model is not None or engine_config:
            raise ValueError("pass either an Engine or a model and its config, not both")
        self.engine = engine
        self._engine_lock = threading.Lock()  # held while the engine runs
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._template: ChatTemplate | None = None

    # ---- batching ----------------------------------------------------------------------
    def _run(self, items: list[tuple[str, SamplingParams]]) -> list[RequestOutput]:
        pending = [_Pending(p, sp) for p, sp in items]
        with self._queue_lock:
            self._queue.extend(pending)
        futures = [x.future for x in pending]
        while not all(f.done() for f in futures):
            if self._engine_lock.acquire(blocking=False):
                try:
                    self._drain()
                finally:
                    self._engine_lock.release()
            # A leader may be running our requests: wait, then re-check (its batch may have
            # closed just before ours were queued, and nobody else may be left to lead).
            wait(futures, timeout=0.005)
        return [f.result() for f in futures]

    def _drain(self) -> None:
        while True:
            with self._queue_lock:
                batch, self._queue = self._queue, []
            if not batch:
                return
            try:
                outs = self.engine.generate([x.prompt for x in batch], [x.params for x in batch])
            except Exception:
                if len(batch) > 1:  # one bad request must not fail the programs batched with it
                    for x in batch:
                        self._run_one(x)
                    continue
                self._run_one(batch[0])
                continue
            except BaseException as e:  # every waiter gets the failure, nobody hangs
                for x in batch:
                    x.future.set_exception(e)
                raise
            for x, out in zip(batch, outs):
                x.future.set_result(out)

    def _run_one(self, x: _Pending) -> None:
        try:
            (out,) = self.engine.generate([x.prompt], [x.params])
        except Exception as e:
            x.future.set_exception(BackendError(f"{type(e).__name__}: {e}"))
        else:
            x.future.set_result(out)

    # ---- Backend -----------------------------------------------------------------------
    def generate(self, prompt: str, params: GenParams) -> GenResult:
        (out,) = self._run([(prompt, _sampling(params))])
        return _result(out)

    def stream(self, prompt: str, params: GenParams) -> Iterator[GenChunk]:
        sp = _sampling(params)
        n_prompt = len(self.engine.encode(prompt))
        text, n_out, cached, finish = "", 0, 0, None
        with self._engine_lock:
            for chunk in self.engine.stream(prompt, sp):
                text += chunk.text
                n_out += len(chunk.token_ids)
                cached, finish = chunk.cached_tokens, chunk.finish_reason or finish
                if chunk.text:
                    yield GenChunk(chunk.text)
        if finish == "abort":
            raise BackendError("the engine aborted the request")
        yield GenChunk("", GenResult(text, n_prompt, cached, n_out, finish))

    def prompt_logprobs(self, prompts: Sequence[str],
                        logprob_start_len: int = 0) -> list[PromptScores]:
        from radixrt.sampling_params import SamplingParams

        sp = SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=True,
                            logprob_start_len=logprob_start_len)
        outs = self._run([(p, sp) for p in prompts])
        scores = []
        for out in outs:
            _check(out)
            assert out.prompt_logprobs is not None, "the engine returned no prompt logprobs"
            scores.append(PromptScores(list(out.prompt_token_ids), list(out.prompt_logprobs),
                                       out.prompt_tokens, out.cached_tokens))
        return scores

    def cache_prefix(self, prompt: str) -> GenResult:
        return self.generate(prompt, GenParams(max_tokens=1, temperature=0.0))

    def chat_template(self) -> ChatTemplate:
        if self._template is None:
            if self.engine.tokenizer is None:
                raise BackendError("this model has no tokenizer, so no chat template")
            self._template = ChatTemplate.from_tokenizer(self.engine.tokenizer)
        return self._template


def _sampling(params: GenParams) -> SamplingParams:
    from radixrt.sampling_params import SamplingParams

    return SamplingParams(max_new_tokens=params.max_tokens, temperature=params.temperature,
                          top_p=params.top_p, top_k=params.top_k, stop=params.stop,
                          seed=params.seed, regex=params.regex, json_schema=params.json_schema,
                          ebnf=params.ebnf)


def _check(out: RequestOutput) -> None:
    errors = [o.error for o in out.outputs if o.finish_reason == "abort"]
    if errors:
        raise BackendError(f"the engine aborted the request: {errors[0] or 'unknown reason'}")


def _result(out: RequestOutput) -> GenResult:
    _check(out)
    return GenResult(out.text, out.prompt_tokens, out.cached_tokens, out.completion_tokens,
                     out.finish_reason)
