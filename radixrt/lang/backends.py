"""What a DSL program runs on: the ``Backend`` protocol and the in-process ``EngineBackend``.

A backend turns prompt text into generations, prompt logprobs (for ``select``) and a
cache-warming request (for ``fork``). The HTTP twin is ``RuntimeEndpoint`` (http_backend.py).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from radixrt.lang.chat_template import ChatTemplate
from radixrt.lang.params import BackendError, GenChunk, GenParams, GenResult
from radixrt.lang.scoring import PromptScores

if TYPE_CHECKING:
    from radixrt.engine.engine import Engine, RequestOutput
    from radixrt.sampling_params import SamplingParams

__all__ = ["Backend", "BackendError", "EngineBackend", "GenChunk", "GenParams", "GenResult"]

Prompt = str | list[int]


class Backend(Protocol):
    def generate(self, prompt: str, params: GenParams) -> GenResult: ...

    def stream(self, prompt: str, params: GenParams) -> Iterator[GenChunk]: ...

    def prompt_logprobs(self, prompts: Sequence[Prompt],
                        logprob_start_len: int = 0) -> list[PromptScores]:
        """Score each prompt's tokens at index >= ``logprob_start_len``; earlier tokens may be
        served from the prefix cache (their logprobs None). The prompts stay cached."""
        ...

    def cache_prefix(self, prompt: str) -> GenResult:
        """Prefill ``prompt`` only (max_new_tokens 0), leaving it in the prefix cache."""
        ...

    def chat_template(self) -> ChatTemplate: ...

    def flush_cache(self) -> bool: ...

    def get_server_info(self) -> dict[str, Any]: ...

    def reasoning_parser(self) -> str | None: ...


@dataclass
class _Pending:
    prompt: Prompt
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
    def _run(self, items: list[tuple[Prompt, SamplingParams]]) -> list[RequestOutput]:
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
                # One bad request must not fail the programs batched with it.
                for x in batch:
                    self._run_one(x)
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
        sp = _sampling(params)
        if params.return_logprob and params.logprob_start_len is not None:
            sp = dataclasses.replace(sp, prompt_logprobs=True,
                                     logprob_start_len=params.logprob_start_len)
        (out,) = self._run([(prompt, sp)])
        _check(out)
        meta = self._logprob_meta(out, params) if params.return_logprob else {}
        return GenResult(out.text, out.prompt_tokens, out.cached_tokens, out.completion_tokens,
                         out.finish_reason, [o.text for o in out.outputs], meta)

    def stream(self, prompt: str, params: GenParams) -> Iterator[GenChunk]:
        if params.return_logprob:
            raise BackendError("return_logprob on a streamed gen is not supported in process "
                               "(use stream=False, or a server)")
        if params.max_tokens == 0:
            yield GenChunk("", self.generate(prompt, params))
            return
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
        yield GenChunk("", GenResult(text, n_prompt, cached, n_out, finish, [text]))

    def prompt_logprobs(self, prompts: Sequence[Prompt],
                        logprob_start_len: int = 0) -> list[PromptScores]:
        from radixrt.sampling_params import SamplingParams

        sp = SamplingParams(max_new_tokens=0, temperature=0.0, prompt_logprobs=True,
                            logprob_start_len=logprob_start_len)
        outs = self._run([(p, sp) for p in prompts])
        scores = []
        for out in outs:
            _check(out)
            assert out.prompt_logprobs is not None, "the engine returned no prompt logprobs"
            ids = list(out.prompt_token_ids)
            texts = [None] * logprob_start_len + [self._piece(t) for t in ids[logprob_start_len:]]
            scores.append(PromptScores(ids, list(out.prompt_logprobs), out.prompt_tokens,
                                       out.cached_tokens, 0, texts[:len(ids)]))
        return scores

    def cache_prefix(self, prompt: str) -> GenResult:
        return self.generate(prompt, GenParams(max_tokens=0, temperature=0.0))

    def chat_template(self) -> ChatTemplate:
        if self._template is None:
            if self.engine.tokenizer is None:
                raise BackendError("this model has no tokenizer, so no chat template")
            self._template = ChatTemplate.from_tokenizer(self.engine.tokenizer)
        return self._template

    def flush_cache(self) -> bool:
        with self._engine_lock:
            return bool(self.engine.flush_cache())

    def get_server_info(self) -> dict[str, Any]:
        cfg = self.engine.config
        info = {k: v for k, v in vars(cfg).items() if isinstance(v, (str, int, float, bool))}
        return {"backend": "radixrt.EngineBackend", **info}

    def reasoning_parser(self) -> str | None:
        return None

    # ---- logprobs ----------------------------------------------------------------------
    def _piece(self, token_id: int) -> str | None:
        tok = self.engine.tokenizer
        return None if tok is None else str(tok.decode([token_id]))

    def _logprob_meta(self, out: RequestOutput, params: GenParams) -> dict[str, Any]:
        """SGLang's meta_info logprob fields: rows ``[logprob, id, text]``."""
        def text(t: int) -> str | None:
            return self._piece(t) if params.return_text_in_logprobs else None

        o = out.outputs[0]
        lps = o.logprobs or []
        meta: dict[str, Any] = {"output_token_logprobs": [
            [lp, t, text(t)] for lp, t in zip(lps, o.token_ids)]}
        if params.top_logprobs_num:
            meta["output_top_logprobs"] = [[[lp, t, text(t)] for t, lp in pos]
                                           for pos in (o.top_logprobs or [])]
        if params.logprob_start_len is not None and out.prompt_logprobs is not None:
            start = params.logprob_start_len
            meta["input_token_logprobs"] = [
                [lp, t, text(t)] for lp, t in zip(out.prompt_logprobs[start:],
                                                  out.prompt_token_ids[start:])]
        return meta


def _sampling(params: GenParams) -> SamplingParams:
    from radixrt.sampling_params import SamplingParams

    return SamplingParams(
        max_new_tokens=params.max_tokens, min_new_tokens=params.min_tokens,
        temperature=params.temperature,
        top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
        stop=params.stop, stop_token_ids=params.stop_token_ids, stop_regex=params.stop_regex,
        ignore_eos=params.ignore_eos,
        n=params.n, seed=params.seed, regex=params.regex, json_schema=params.json_schema,
        ebnf=params.ebnf, logprobs=params.return_logprob, top_logprobs=params.top_logprobs_num)


def _check(out: RequestOutput) -> None:
    errors = [o.error for o in out.outputs if o.finish_reason == "abort"]
    if errors:
        raise BackendError(f"the engine aborted the request: {errors[0] or 'unknown reason'}")
