"""One HTTP request's generation: engine requests in, per-choice text updates out.

An HTTP request may hold several prompts (completions batch) of n samples each; every prompt is
one engine request, and choice ``i`` is sample ``i % n`` of prompt ``i // n``. All engine
requests share one queue, so the consumer sees one merged stream. Text is detokenized
incrementally here; a completed stop string ends that sample (finish_reason "stop") and
aborts it in the worker. Without a tokenizer (codec None) there is no detokenizer: updates carry
token ids and empty text. Leaving the stream early (client gone, error) aborts what is left.

Detokenization stays on the event loop on purpose: each delta costs O(window + stop strings)
(the detokenizer decodes a short window, SamplingParams caps stop strings at 64 x 1,024
characters), so no single request can make it long, and a thread hop per delta would cost more
than the work. The unbounded text work (decoding bodies, tokenizing prompts, chat templates)
runs in the router's text pool instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from radixrt.constrained.sequences import GRAMMAR_ERROR_PREFIX
from radixrt.sampling_params import SamplingParams
from radixrt.server.engine_client import (
    EngineClient,
    Event,
    RequestRejected,
    RequestState,
    RequestTimeout,
    WorkerFailure,
)
from radixrt.server.messages import DeltaMsg
from radixrt.server.metrics import ServerMetrics
from radixrt.server.protocol import APIError
from radixrt.server.stop_regex import StopRegexMatcher, StopRegexTimeout
from radixrt.server.tokenization import TextCodec
from radixrt.text.detokenizer import IncrementalDetokenizer


@dataclass
class ChoiceUpdate:
    choice: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # set on the sample's last update
    matched_stop: str | int | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class ClientAbort(RequestRejected):
    """/abort_request ended this engine request (posted to its own queue, by engine rid)."""

    def __init__(self, rid: str) -> None:
        super().__init__(f"request {rid} was aborted by /abort_request")
        self.rid = rid


@dataclass
class _Seq:
    choice: int
    index: int  # sample index within its prompt (the engine's DeltaMsg.index)
    detok: IncrementalDetokenizer | None  # None: no tokenizer, token ids only
    stop_re: StopRegexMatcher | None = None
    token_ids: list[int] = field(default_factory=list)
    open: bool = True


@dataclass
class _Sub:
    state: RequestState
    seqs: list[_Seq]
    prompt_ids: list[int]
    params: SamplingParams
    # Entry k scores prompt_ids[k] (None where not computed); every sample carries a copy.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    last_time: float | None = None


class Generation:
    def __init__(self, client: EngineClient, codec: TextCodec | None, prompts: list[list[int]],
                 params: SamplingParams | Sequence[SamplingParams], namespace: str | None,
                 metrics: ServerMetrics, t_arrival: float,
                 timeout_s: float | None = None) -> None:
        """``params``: one for every prompt, or one per prompt (native /generate batches)."""
        self.client = client
        self.metrics = metrics
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        assert len(per_prompt) == len(prompts), "one SamplingParams per prompt"
        self.params = per_prompt[0]
        self.t_arrival = t_arrival
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.usage = Usage()
        self.subs: dict[str, _Sub] = {}
        self._choice_subs: list[_Sub] = []  # choice i -> the engine request serving it
        self._choice_prompt: list[int] = []  # choice i -> its prompt's index
        try:
            for p_idx, (ids, sp) in enumerate(zip(prompts, per_prompt)):
                st = client.submit(ids, sp, namespace, self.queue, t_arrival, timeout_s)
                first = len(self._choice_subs)
                seqs = [_Seq(first + i, i, None if codec is None else
                             IncrementalDetokenizer(codec.tokenizer, sp.skip_special_tokens,
                                                    sp.stop, context_token_ids=ids[-5:]),
                             StopRegexMatcher(sp.stop_regex) if sp.stop_regex else None)
                        for i in range(sp.n)]
                self.subs[st.rid] = _Sub(st, seqs, list(ids), sp)
                self._choice_subs.extend([self.subs[st.rid]] * sp.n)
                self._choice_prompt.extend([p_idx] * sp.n)
        except BaseException:  # whatever failed, the requests already submitted are aborted
            self.close()
            raise

    @property
    def num_choices(self) -> int:
        return sum(len(s.seqs) for s in self.subs.values())

    def sub_of(self, choice: int) -> _Sub:
        """The engine request serving ``choice`` (its prompt, params, token counts)."""
        return self._choice_subs[choice]

    def prompt_of(self, choice: int) -> int:
        return self._choice_prompt[choice]

    def engine_rids(self) -> list[str]:
        return list(self.subs)

    def abort_by_client(self, rid: str) -> None:
        """End engine request ``rid`` now (/abort_request): its open samples finish "abort"."""
        sub = self.subs.get(rid)
        if sub is not None and any(s.open for s in sub.seqs):
            self.client.abort(rid)
            self.queue.put_nowait(ClientAbort(rid))

    def input_token_logprobs(self, choice: int) -> list[list[Any]] | None:
        """``[[logprob_or_None, token_id], ...]``, one row per prompt token of ``choice``
        (SGLang's layout); None until the engine has sent the prompt logprobs."""
        sub = self._choice_subs[choice]
        if sub.prompt_logprobs is None:
            return None
        return [[lp, tok] for lp, tok in zip(sub.prompt_logprobs, sub.prompt_ids)]

    def close(self) -> None:
        """Abort every engine request still open (synchronous: safe in a cancelled task)."""
        for rid, sub in self.subs.items():
            if any(s.open for s in sub.seqs):
                for s in sub.seqs:
                    s.open = False
                self.client.abort(rid)

    async def updates(self) -> AsyncIterator[ChoiceUpdate]:
        try:
            while any(s.open for sub in self.subs.values() for s in sub.seqs):
                ev = await self.queue.get()
                if isinstance(ev, RequestTimeout):
                    raise APIError(504, f"Generation timed out: {ev}", err_type="timeout",
                                   param="timeout")
                if isinstance(ev, WorkerFailure):
                    raise APIError(503, f"Generation failed: {ev}", err_type="server_error")
                if isinstance(ev, ClientAbort):
                    for ended in self._client_aborted(ev.rid):
                        yield ended
                    continue
                if isinstance(ev, RequestRejected):
                    raise APIError(400, str(ev))
                upd = self._on_delta(ev)
                if upd is not None:
                    yield upd
            self.metrics.e2e.observe(time.monotonic() - self.t_arrival)
        finally:
            self.close()

    def _client_aborted(self, rid: str) -> list[ChoiceUpdate]:
        sub = self.subs[rid]
        out = []
        for seq in sub.seqs:
            if seq.open:
                text = seq.detok.flush() if seq.detok is not None else ""
                out.append(ChoiceUpdate(seq.choice, text, [], finish_reason="abort"))
                self._close_seq(sub, seq, worker_done=True, released=True)
        return out

    def _on_delta(self, d: DeltaMsg) -> ChoiceUpdate | None:
        sub = self.subs.get(d.rid)
        if sub is not None and d.prompt_logprobs is not None:
            assert len(d.prompt_logprobs) == len(sub.prompt_ids), (
                f"{d.rid}: {len(d.prompt_logprobs)} prompt logprobs for "
                f"{len(sub.prompt_ids)} prompt tokens")
            sub.prompt_logprobs = d.prompt_logprobs
            sub.prompt_top_logprobs = d.prompt_top_logprobs
        if sub is None or not 0 <= d.index < len(sub.seqs) or not sub.seqs[d.index].open:
            return None  # tokens after a stop string, or the abort that followed it
        now = time.monotonic()
        if sub.last_time is None:
            self.metrics.ttft.observe(now - self.t_arrival)
        elif d.new_token_ids:
            self.metrics.itl.observe((now - sub.last_time) / len(d.new_token_ids))
        sub.last_time = now
        sub.prompt_tokens, sub.cached_tokens = d.prompt_tokens, d.cached_tokens
        seq = sub.seqs[d.index]
        step = seq.detok.add(d.new_token_ids) if seq.detok is not None else None
        stopped = step is not None and step.stopped
        seq.token_ids.extend(d.new_token_ids)
        upd = ChoiceUpdate(seq.choice, step.text if step is not None else "",
                           list(d.new_token_ids), d.new_logprobs, d.new_top_logprobs)
        keep_stop = sub.params.no_stop_trim
        hit = None
        if seq.stop_re is not None and step is not None and not step.stopped:
            try:
                hit = seq.stop_re.feed(step.text)
            except StopRegexTimeout as e:
                raise APIError(400, str(e), "stop_regex") from None
        if hit is not None:  # kept whole, as SGLang does; the held-back text goes out too
            assert seq.detok is not None, "a regex match needs text"
            upd.text += seq.detok.flush()
            upd.finish_reason, upd.matched_stop = "stop", hit
            stopped = not d.finished
        elif step is not None and step.stopped:
            upd.finish_reason, upd.matched_stop = "stop", step.matched_stop
            if keep_stop and step.matched_stop is not None:
                upd.text += step.matched_stop
        elif d.finished:
            if d.finish_reason == "abort":
                if d.error is not None and d.error.startswith(GRAMMAR_ERROR_PREFIX):
                    # The request's grammar failed to compile in the worker: the client's.
                    constraint = sub.params.constraint
                    raise APIError(400, d.error, constraint[0] if constraint else None)
                raise APIError(500, f"The engine aborted the request: {d.error or 'unknown'}",
                               err_type="server_error")
            if seq.detok is not None:
                if keep_stop and d.matched_stop_token is not None:
                    upd.text += seq.detok.add([d.matched_stop_token]).text
                upd.text += seq.detok.flush()
            upd.finish_reason = d.finish_reason or "stop"
            upd.matched_stop = d.matched_stop_token
        if upd.finish_reason is not None:
            self._close_seq(sub, seq, worker_done=d.finished and not stopped)
        return upd

    def _close_seq(self, sub: _Sub, seq: _Seq, worker_done: bool,
                   released: bool = False) -> None:
        seq.open = False
        self.usage.completion_tokens += len(seq.token_ids)
        self.metrics.generation_tokens.inc(len(seq.token_ids))
        rid = sub.state.rid
        if any(s.open for s in sub.seqs):
            if not worker_done:  # a stop string ended this sample; the others go on
                self.client.abort(rid, seq.index)
            return
        self.usage.prompt_tokens += sub.prompt_tokens
        self.usage.cached_tokens += sub.cached_tokens
        self.metrics.prompt_tokens.inc(sub.prompt_tokens)
        self.metrics.cached_tokens.inc(sub.cached_tokens)
        if released:
            return
        if worker_done:
            self.client.release(rid, sub.seqs[0].token_ids)
        else:
            self.client.abort(rid)
