"""The HTTP front: FastAPI app with the OpenAI-compatible and native endpoints.

Each handler validates the body (400 on bad input), tokenizes (chat template for chat), turns
the request into a Job and runs it through ``serving`` (streamed as SSE or collected). A server
without a tokenizer takes token-id prompts only; text, chat and stop strings get a 400.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from radixrt.server import protocol as p
from radixrt.server.serving import Job, ServingContext, run_full, run_stream, start

log = logging.getLogger("radixrt.router")

_OPEN_PATHS = ("/health", "/metrics")


def _error(e: p.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class ApiKeyAuth:
    """Bearer-key check as a plain ASGI middleware; the matched key lands in
    ``request.state.api_key`` (None without keys). Starlette's ``@app.middleware("http")`` would
    re-stream every response body through an extra task: on short streamed requests that was
    the router's largest cost."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["api_key"] = None
        if self.keys and scope["path"] not in _OPEN_PATHS:
            header = next((v.decode("latin-1") for k, v in scope["headers"]
                           if k == b"authorization"), "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else ""
            match = next((k for k in self.keys
                          if hmac.compare_digest(k.encode(), token.encode())), None)
            if match is None:
                await _error(p.APIError(401, "Invalid or missing API key (send 'Authorization: "
                                        "Bearer <key>')", None, "invalid_api_key"))(scope, receive, send)
                return
            state["api_key"] = match
        await self.app(scope, receive, send)


def _namespace(ctx: ServingContext, request: Request, salt: Any) -> str | None:
    """Cache namespace: the API key's tenant (when keys are set) and the request's cache_salt."""
    parts = []
    key = getattr(request.state, "api_key", None)
    if key is not None and len(ctx.cfg.api_keys) > 1:
        parts.append("key:" + hashlib.sha256(key.encode()).hexdigest()[:16])
    s = p.validate_cache_salt(salt)
    if s is not None:
        parts.append("salt:" + s)
    return "|".join(parts) or None


def _prompt_ids(ctx: ServingContext, prompt: str | list[int], param: str) -> list[int]:
    if isinstance(prompt, str):
        if ctx.codec is None:
            raise p.no_tokenizer(f"{param} is text; send a list of token ids", param)
        ids = ctx.codec.encode(prompt)
    else:
        p.check_token_ids(prompt, ctx.limits.vocab_size, param)
        ids = prompt
    if not ids:
        raise p.bad_request(f"{param} is empty", param)
    return ids


def _finish_params(ctx: ServingContext, params: Any, prompts: list[list[int]],
                   max_tokens: int | None, default: int | None) -> Any:
    out = params
    for ids in prompts:  # every prompt must fit; they share max_tokens
        out = p.finalize_params(params, len(ids), max_tokens, ctx.limits, default)
    return out


def chat_job(ctx: ServingContext, request: Request, raw: bytes) -> Job:
    req = p.parse_body(raw, p.ChatCompletionRequest)
    p.check_model_name(req.model, ctx.served_names)
    if ctx.codec is None:
        raise p.no_tokenizer("chat messages need a chat template and a tokenizer; use "
                             "/v1/completions or /generate with token ids", "messages")
    messages = p.chat_messages(req.messages)
    namespace = _namespace(ctx, request, req.cache_salt)
    params = p.openai_params(req)
    ids = ctx.codec.chat_ids(messages, req.add_generation_prompt, req.continue_final_message,
                             req.chat_template_kwargs)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    params = _finish_params(ctx, params, [ids], max_tokens, None)
    return Job("chat", [ids], params, namespace, req.stream,
               bool(req.stream_options and req.stream_options.include_usage))


def completion_job(ctx: ServingContext, request: Request, raw: bytes) -> Job:
    req = p.parse_body(raw, p.CompletionRequest)
    p.check_model_name(req.model, ctx.served_names)
    if req.echo:
        raise p.bad_request("echo is not supported", "echo")
    if req.suffix:
        raise p.bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise p.bad_request("best_of must equal n (or be omitted)", "best_of")
    namespace = _namespace(ctx, request, req.cache_salt)
    params = p.openai_params(req)
    if ctx.codec is None:
        p.check_token_only(params)
    prompts = [_prompt_ids(ctx, x, "prompt") for x in p.prompt_inputs(req.prompt)]
    # OpenAI's legacy default for /v1/completions is 16 tokens.
    params = _finish_params(ctx, params, prompts, req.max_tokens, 16)
    return Job("completion", prompts, params, namespace, req.stream,
               bool(req.stream_options and req.stream_options.include_usage))


def generate_job(ctx: ServingContext, request: Request, raw: bytes) -> Job:
    req = p.parse_body(raw, p.GenerateRequest)
    if (req.text is None) == (req.input_ids is None):
        raise p.bad_request("exactly one of text or input_ids is required", "text")
    namespace = _namespace(ctx, request, req.cache_salt)
    params = p.native_params(req.sampling_params)
    if ctx.codec is None:
        p.check_token_only(params)
    prompt: str | list[int] = req.text if req.text is not None else (req.input_ids or [])
    if isinstance(prompt, str) and not prompt:
        raise p.bad_request("text is empty", "text")
    ids = _prompt_ids(ctx, prompt, "text" if req.text is not None else "input_ids")
    given = (req.sampling_params or {})
    max_tokens = given.get("max_new_tokens", given.get("max_tokens", params.max_new_tokens))
    params = _finish_params(ctx, params, [ids], max_tokens, None)
    return Job("generate", [ids], params, namespace, req.stream)


def build_app(ctx: ServingContext) -> FastAPI:
    app = FastAPI(title="radixrt", docs_url=None, redoc_url=None)

    app.add_middleware(ApiKeyAuth, keys=ctx.cfg.api_keys)

    async def generate(request: Request, make: Callable[..., Job]) -> Response:
        try:
            job = make(ctx, request, await request.body())
            gen = start(ctx, job)
        except p.APIError as e:
            kind = make.__name__.removesuffix("_job")
            ctx.metrics.requests.inc(endpoint=kind, status=str(e.status))
            if e.status >= 500:
                log.warning("rejected request: %s", e.message)
            return _error(e)
        if job.stream:
            return StreamingResponse(run_stream(ctx, job, gen), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await run_full(ctx, job, gen, request.is_disconnected))
        except p.APIError as e:
            return _error(e)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, chat_job)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, completion_job)

    @app.post("/generate")
    async def native(request: Request) -> Response:
        return await generate(request, generate_job)

    @app.get("/v1/models")
    async def models() -> Response:
        data = [{"id": name, "object": "model", "created": int(time.time()),
                 "owned_by": "radixrt", "max_model_len": ctx.limits.max_context_len}
                for name in ctx.served_names[:1]]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> Response:
        ok, why = ctx.client.healthy()
        if ok:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "reason": why}, status_code=503)

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        if await ctx.client.flush_cache():
            return JSONResponse({"flushed": True})
        return _error(p.APIError(400, "Cache not flushed: requests are running (retry when "
                                 "idle)", None, "invalid_request_error"))

    @app.get("/metrics")
    async def metrics() -> Response:
        for w in ctx.client.workers:
            ok = w.alive and time.monotonic() - w.last_pong <= ctx.cfg.health_timeout_s
            ctx.metrics.set_worker(w.wid, w.stats, ok)
        return PlainTextResponse(ctx.metrics.registry.render(),
                                 media_type="text/plain; version=0.0.4")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return _error(p.APIError(500, f"Internal server error: {type(exc).__name__}"))

    return app
