"""Endpoint logic: validated requests -> Generation -> OpenAI / native response bodies or SSE.

Without a tokenizer (``ctx.codec is None``) responses carry token ids: ``text`` is "", each
completions choice (and stream chunk) gets a ``token_ids`` list of its generated ids, and
logprob entries name tokens as ``"token_id:<id>"`` with ``bytes`` null (vLLM's spelling for
tokens it does not turn into strings).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from radixrt.sampling_params import SamplingParams
from radixrt.server.config import ServerConfig
from radixrt.server.engine_client import EngineClient
from radixrt.server.generation import ChoiceUpdate, Generation
from radixrt.server.metrics import ServerMetrics
from radixrt.server.native_output import NativeLogprobs, finish_reason
from radixrt.server.native_protocol import LogprobOptions
from radixrt.server.protocol import APIError, ModelLimits
from radixrt.server.text_pool import TextPool
from radixrt.server.tokenization import TextCodec
from radixrt.server.tool_calls import ToolPlan
from radixrt.server.tool_calls import parse as parse_tool_calls
from radixrt.server.tool_stream import StreamParser
from radixrt.text.template_sandbox import TemplateSandbox

log = logging.getLogger("radixrt.router")


@dataclass
class ServingContext:
    cfg: ServerConfig
    client: EngineClient
    codec: TextCodec | None  # None: no tokenizer, token ids in and out
    metrics: ServerMetrics
    limits: ModelLimits
    served_names: tuple[str, ...]
    # Body decoding, tokenization and chat templating run here, never on the event loop.
    text_pool: TextPool = field(default_factory=TextPool)
    # Renders client-supplied chat templates (None unless --allow-request-chat-template).
    templates: TemplateSandbox | None = None
    # Native requests in flight by (owner, client-facing rid), for /abort_request: one
    # tenant's rids neither collide with nor reveal another's.
    active: dict[tuple[str | None, str], ActiveRequest] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.templates is None and self.cfg.allow_request_chat_template:
            # A template's output is tokenized next: bound it by the body limit, with room.
            self.templates = TemplateSandbox(self.cfg.chat_template_timeout_s,
                                             max_chars=2 * self.cfg.max_request_bytes)

    @property
    def model_name(self) -> str:
        return self.served_names[0]


@dataclass(frozen=True)
class ActiveRequest:
    gen_ref: weakref.ref[Generation]  # weak: a stream never started must not be kept alive
    engine_rid: str
    owner: str | None  # the API key's tenant that sent it (None: no keys)

    @property
    def gen(self) -> Generation | None:
        return self.gen_ref()


@dataclass
class Job:
    """A validated generation request, ready to run."""

    kind: str  # "chat" | "completion" | "generate"
    prompts: list[list[int]]
    params: SamplingParams
    namespace: str | None
    stream: bool
    include_usage: bool = False
    # Chat with tools (tool_choice not "none"): the output is parsed into tool_calls.
    tools: ToolPlan | None = None
    timeout_s: float | None = None  # the request's own deadline (``timeout``)
    # Native /generate: a batch is answered with a list; each prompt has its own params, rid
    # and SGLang logprob options.
    batched: bool = False
    params_list: list[SamplingParams] | None = None
    rids: list[str] | None = None
    logprob_options: list[LogprobOptions | None] | None = None
    owner: str | None = None


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _token_entry(codec: TextCodec | None, tok: int, lp: float) -> dict[str, Any]:
    if codec is None:  # no text for the token: name it by id, no bytes (OpenAI allows null)
        return {"token": f"token_id:{tok}", "logprob": lp, "bytes": None}
    piece = codec.piece(tok)
    return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}


def _logprob_entry(codec: TextCodec | None, tok: int, lp: float,
                   top: list[tuple[int, float]] | None) -> dict[str, Any]:
    return {**_token_entry(codec, tok, lp),
            "top_logprobs": [_token_entry(codec, t, v) for t, v in (top or [])]}


class Responder:
    """Builds response bodies for one job; accumulates per-choice state for non-streaming."""

    def __init__(self, ctx: ServingContext, job: Job, gen: Generation) -> None:
        self.ctx, self.job, self.gen = ctx, job, gen
        prefix = {"chat": "chatcmpl-", "completion": "cmpl-"}.get(job.kind, "")
        self.id = prefix + uuid.uuid4().hex
        self.created = int(time.time())
        n = gen.num_choices
        self.texts = [""] * n
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.matched: list[str | int | None] = [None] * n
        self.lps: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.want_lp = job.params.logprobs
        self.native: NativeLogprobs | None = None
        opts = job.logprob_options or []
        if job.kind == "generate" and any(opts):
            self.native = NativeLogprobs(ctx.codec, gen, [opts[gen.prompt_of(i)] for i in range(n)])
        self.token_only = ctx.codec is None
        self.tool_streams = ([StreamParser(job.tools) for _ in range(n)]
                             if job.tools is not None else None)

    def _lp_entries(self, u: ChoiceUpdate) -> list[dict[str, Any]]:
        if not self.want_lp or u.logprobs is None:
            return []
        tops = u.top_logprobs or [None] * len(u.token_ids)  # type: ignore[list-item]
        return [_logprob_entry(self.ctx.codec, t, lp, top)
                for t, lp, top in zip(u.token_ids, u.logprobs, tops)]

    def absorb(self, u: ChoiceUpdate) -> list[dict[str, Any]]:
        i = u.choice
        self.texts[i] += u.text
        self.ids[i].extend(u.token_ids)
        entries: list[dict[str, Any]] = []
        if self.job.kind == "generate":  # SGLang's rows, rendered when a body is built
            if self.native is not None:
                self.native.add(i, u.token_ids, u.logprobs, u.top_logprobs)
        else:
            entries = self._lp_entries(u)
            self.lps[i].extend(entries)
        if u.finish_reason is not None:
            self.finish[i], self.matched[i] = u.finish_reason, u.matched_stop
        return entries

    def _completion_lp(self, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not self.want_lp:
            return None
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                                 for e in entries],
                "text_offset": []}

    def _ids_field(self, ids: list[int]) -> dict[str, Any]:
        """Without a tokenizer, completions choices carry their token ids (text is empty)."""
        return {"token_ids": ids} if self.token_only else {}

    # ---------------------------------------------------------------- non-streaming
    def final_body(self) -> Any:
        usage = self.gen.usage.as_dict()
        n = len(self.texts)
        if self.job.kind == "chat":
            choices = [{"index": i, **self._message(i),
                        "logprobs": {"content": self.lps[i]} if self.want_lp else None,
                        "matched_stop": self.matched[i]}
                       for i in range(n)]
            return {"id": self.id, "object": "chat.completion", "created": self.created,
                    "model": self.ctx.model_name, "choices": choices, "usage": usage}
        if self.job.kind == "completion":
            choices = [{"index": i, "text": self.texts[i],
                        "logprobs": self._completion_lp(self.lps[i]),
                        "finish_reason": self.finish[i], "matched_stop": self.matched[i],
                        **self._ids_field(self.ids[i])}
                       for i in range(n)]
            return {"id": self.id, "object": "text_completion", "created": self.created,
                    "model": self.ctx.model_name, "choices": choices, "usage": usage}
        outs = [self._native(i, final=True) for i in range(n)]
        return outs if self.job.batched or n > 1 else outs[0]

    def _message(self, i: int) -> dict[str, Any]:
        """A chat choice's message and finish_reason (tool calls parsed out of the text)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.texts[i]}
        finish = self.finish[i]
        if self.job.tools is not None:
            content, calls = parse_tool_calls(self.job.tools, self.texts[i])
            if calls:
                msg["content"] = content or None
                msg["tool_calls"] = calls
                if finish == "stop":
                    finish = "tool_calls"
        return {"message": msg, "finish_reason": finish}

    def _native(self, i: int, final: bool) -> dict[str, Any]:
        """SGLang's result object; in a stream every event has the text so far and its
        prompt's token counts."""
        sub = self.gen.sub_of(i)
        rids = self.job.rids
        meta: dict[str, Any] = {
            "id": rids[self.gen.prompt_of(i)] if rids else self.id,
            "finish_reason": finish_reason(self.finish[i], self.matched[i],
                                           sub.params.max_new_tokens),
            "prompt_tokens": len(sub.prompt_ids), "completion_tokens": len(self.ids[i]),
            "cached_tokens": sub.cached_tokens,
            "e2e_latency": time.monotonic() - self.gen.t_arrival}
        if self.native is not None and self.native.wants(i):
            meta.update(self.native.fields(i))
        elif final and sub.params.prompt_logprobs:
            # Sent once, on the last event: the rows are as long as the prompt.
            meta["input_token_logprobs"] = self.gen.input_token_logprobs(i)
        out: dict[str, Any] = {"text": self.texts[i], "output_ids": self.ids[i],
                               "meta_info": meta}
        if self.job.batched or len(self.texts) > 1:
            out["index"] = i  # SGLang tags a batch's (or n > 1) results with their place
        return out

    # ---------------------------------------------------------------- streaming
    def chunk(self, u: ChoiceUpdate, first: bool) -> dict[str, Any] | None:
        entries = self.absorb(u)
        # Text held back (an unfinished UTF-8 sequence) is not news; without a tokenizer,
        # new token ids are.
        news = bool(u.text) or (self.token_only and bool(u.token_ids))
        if self.job.kind == "generate":
            if not news and u.finish_reason is None and not first:
                return None
            # Cumulative, like SGLang.
            return self._native(u.choice, final=u.finish_reason is not None)
        if self.job.kind == "chat":
            text, finish = u.text, u.finish_reason
            calls: list[dict[str, Any]] = []
            if self.tool_streams is not None:  # calls stream as they are generated
                parser = self.tool_streams[u.choice]
                text, calls = parser.feed(u.text)
                if finish is not None:
                    rest, more = parser.finish()
                    text, calls = text + rest, calls + more
                    if parser.called and finish == "stop":
                        finish = "tool_calls"
            delta: dict[str, Any] = {"content": text}
            if calls:
                delta["content"] = text or None
                delta["tool_calls"] = calls
            if first:
                delta["role"] = "assistant"
            if not text and not calls and finish is None and not first:
                return None
            choice: dict[str, Any] = {"index": u.choice, "delta": delta,
                                      "logprobs": {"content": entries} if self.want_lp else None,
                                      "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            if not news and u.finish_reason is None:
                return None
            choice = {"index": u.choice, "text": u.text,
                      "logprobs": self._completion_lp(entries), "finish_reason": u.finish_reason,
                      **self._ids_field(u.token_ids)}
            obj = "text_completion"
        if u.finish_reason is not None:
            choice["matched_stop"] = u.matched_stop
        out = {"id": self.id, "object": obj, "created": self.created,
               "model": self.ctx.model_name, "choices": [choice]}
        if self.job.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.ctx.model_name, "choices": [], "usage": self.gen.usage.as_dict()}


def start(ctx: ServingContext, job: Job) -> Generation:
    for rid in job.rids or []:
        entry = ctx.active.get((job.owner, rid))
        if entry is not None and entry.gen is not None:
            raise APIError(400, f"rid {rid!r} is already in use by a running request", "rid")
    gen = Generation(ctx.client, ctx.codec, job.prompts, job.params_list or job.params,
                     job.namespace, ctx.metrics, time.monotonic(), job.timeout_s)
    for rid, engine_rid in zip(job.rids or [], gen.engine_rids()):
        ctx.active[(job.owner, rid)] = ActiveRequest(weakref.ref(gen), engine_rid, job.owner)
    return gen


def finish(ctx: ServingContext, job: Job, gen: Generation) -> None:
    """The job is over: abort what is left of it, forget its rids."""
    gen.close()
    for rid in job.rids or []:
        entry = ctx.active.get((job.owner, rid))
        if entry is not None and entry.gen in (gen, None):
            del ctx.active[(job.owner, rid)]


async def run_stream(ctx: ServingContext, job: Job, gen: Generation) -> AsyncIterator[bytes]:
    """SSE body. A client that goes away cancels this generator; `finally` aborts the rest."""
    r = Responder(ctx, job, gen)
    seen: set[int] = set()
    status = "ok"
    try:
        async for u in gen.updates():
            c = r.chunk(u, first=u.choice not in seen)
            seen.add(u.choice)
            if c is not None:
                yield sse(c)
        if job.include_usage and job.kind != "generate":
            yield sse(r.usage_chunk())
    except APIError as e:
        status = "error"
        yield sse(e.body())
    except Exception as e:  # a bug, not the client's: end the stream cleanly, log it
        log.exception("stream failed")
        status = "error"
        yield sse(APIError(500, f"Internal server error: {type(e).__name__}").body())
    except BaseException:
        status = "cancelled"
        raise
    finally:
        finish(ctx, job, gen)
        ctx.metrics.requests.inc(endpoint=job.kind, status=status)
    yield SSE_DONE


async def run_full(ctx: ServingContext, job: Job, gen: Generation,
                   is_disconnected: Callable[[], Awaitable[bool]]) -> Any:
    """Non-streaming: collect everything; abort if the client leaves before the end."""
    r = Responder(ctx, job, gen)

    async def collect() -> None:
        async for u in gen.updates():
            r.absorb(u)

    task = asyncio.ensure_future(collect())
    try:
        while not task.done():
            await asyncio.wait([task], timeout=1.0)
            if not task.done() and await is_disconnected():
                task.cancel()
                ctx.metrics.requests.inc(endpoint=job.kind, status="cancelled")
                raise APIError(499, "client disconnected")
        task.result()  # re-raises APIError from the generation
    except APIError:
        ctx.metrics.requests.inc(endpoint=job.kind, status="error")
        raise
    finally:
        finish(ctx, job, gen)
    ctx.metrics.requests.inc(endpoint=job.kind, status="ok")
    return r.final_body()
