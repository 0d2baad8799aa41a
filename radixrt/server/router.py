"""The HTTP front: FastAPI app with the OpenAI-compatible and native endpoints.

Each handler reads the body under the size limit (413 above it), then, in the text pool and
off the event loop, validates it (400 on bad input, naming the field), tokenizes (chat template
for chat) and turns it into a Job, which runs through ``serving`` (streamed as SSE or
collected). A server without a tokenizer takes token-id prompts only; text, chat and stop
strings get a 400. Every error, 404 and 405 included, is an OpenAI-style body; none re-raises
into uvicorn, so a bad request never costs its keep-alive connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from radixrt.server import protocol as p
from radixrt.server import structured, tool_calls
from radixrt.server.auth import ApiKeyAuth
from radixrt.server.body import read_body
from radixrt.server.job_inputs import namespace_of as _namespace
from radixrt.server.job_inputs import prompt_ids as _prompt_ids
from radixrt.server.native_api import add_native_routes, generate_job
from radixrt.server.serving import Job, ServingContext, run_full, run_stream, start

log = logging.getLogger("radixrt.router")


def _error(e: p.APIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _finish_params(ctx: ServingContext, params: Any, prompts: list[list[int]],
                   max_tokens: int | None, default: int | None) -> Any:
    out = params
    for ids in prompts:  # every prompt must fit; they share max_tokens
        out = p.finalize_params(params, len(ids), max_tokens, ctx.limits, default)
    return out


# The job builders run in ctx.text_pool (decode, tokenize, template), never on the event loop.


def chat_job(ctx: ServingContext, request: Request, raw: bytes) -> Job:
    req = p.parse_body(raw, p.ChatCompletionRequest, ctx.cfg.max_json_depth)
    p.check_model_name(req.model, ctx.served_names)
    template = p.request_chat_template(req, ctx.cfg.allow_request_chat_template)
    if ctx.codec is None:
        raise p.no_tokenizer("chat messages need a chat template and a tokenizer; use "
                             "/v1/completions or /generate with token ids", "messages")
    for name in ("functions", "function_call"):
        if getattr(req, name) is not None:
            raise p.bad_request(f"{name} is not supported; use tools / tool_choice", name)
    messages = p.chat_messages(req.messages)
    namespace = _namespace(ctx, request, req.cache_salt)
    params = p.openai_params(req)
    p.check_sequences(1, params.n, ctx.cfg.max_sequences_per_request)
    client_template = None
    if template is not None:
        assert ctx.templates is not None, "allow_request_chat_template starts the sandbox"
        client_template = (template, ctx.templates)
    plan = tool_calls.make_plan(
        req.tools, req.tool_choice, req.parallel_tool_calls,
        template if template is not None else getattr(ctx.codec.tokenizer, "chat_template", None))
    kwargs = dict(req.chat_template_kwargs or {})
    if plan is not None and plan.choice != "none":
        if plan.native:
            kwargs["tools"] = [t.as_openai() for t in plan.tools]
        else:
            messages = tool_calls.with_system_prompt(messages, plan)
    params = structured.apply_guided(_constrain_chat(params, req, plan), req)
    ids = ctx.codec.chat_ids(messages, req.add_generation_prompt, req.continue_final_message,
                             kwargs, client_template)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    params = _finish_params(ctx, params, [ids], max_tokens, None)
    return Job("chat", [ids], params, namespace, req.stream,
               bool(req.stream_options and req.stream_options.include_usage),
               tools=plan if plan is not None and plan.parses else None,
               timeout_s=p.request_timeout(req.timeout))


def _constrain_chat(params: Any, req: p.ChatCompletionRequest,
                    plan: tool_calls.ToolPlan | None) -> Any:
    """response_format and forced tool calls -> the request's grammar (checked here: 400)."""
    schema = structured.response_format_schema(req.response_format)
    forced = plan is not None and plan.choice in ("required", "named")
    if schema is not None and forced:
        raise p.bad_request("response_format cannot be combined with a required tool call",
                            "response_format")
    if schema is not None:
        params = structured.replace_params(params, json_schema=schema, param="response_format")
    elif forced:
        assert plan is not None
        params = structured.replace_params(params, ebnf=tool_calls.forced_grammar(plan), param="tools")
    structured.check_grammar(params, "response_format" if schema is not None else None)
    return params


def completion_job(ctx: ServingContext, request: Request, raw: bytes) -> Job:
    req = p.parse_body(raw, p.CompletionRequest, ctx.cfg.max_json_depth)
    p.check_model_name(req.model, ctx.served_names)
    if req.echo:
        raise p.bad_request("echo is not supported", "echo")
    if req.suffix:
        raise p.bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise p.bad_request("best_of must equal n (or be omitted)", "best_of")
    namespace = _namespace(ctx, request, req.cache_salt)
    params = p.openai_params(req)
    schema = structured.response_format_schema(req.response_format)
    if schema is not None:
        params = structured.replace_params(params, json_schema=schema, param="response_format")
        structured.check_grammar(params, "response_format")
    params = structured.apply_guided(params, req)
    if ctx.codec is None:
        p.check_token_only(params)
    inputs = p.prompt_inputs(req.prompt)
    p.check_sequences(len(inputs), params.n, ctx.cfg.max_sequences_per_request)
    prompts = [_prompt_ids(ctx, x, "prompt") for x in inputs]
    # OpenAI's legacy default for /v1/completions is 16 tokens.
    params = _finish_params(ctx, params, prompts, req.max_tokens, 16)
    return Job("completion", prompts, params, namespace, req.stream,
               bool(req.stream_options and req.stream_options.include_usage),
               timeout_s=p.request_timeout(req.timeout))


def build_app(ctx: ServingContext) -> FastAPI:
    app = FastAPI(title="radixrt", docs_url=None, redoc_url=None)
    cfg = ctx.cfg
    app.add_middleware(ApiKeyAuth, keys=cfg.api_keys, admin_keys=cfg.admin_api_keys,
                       metrics_require_key=cfg.metrics_require_key)

    def internal(path: str) -> JSONResponse:
        # Answered here, not re-raised: Starlette's error middleware would re-raise it to
        # uvicorn, which then drops the (keep-alive) connection under the client.
        log.exception("unhandled error on %s", path)
        return _error(p.APIError(500, "Internal server error"))

    async def generate(request: Request, make: Callable[..., Job]) -> Response:
        kind = make.__name__.removesuffix("_job")
        try:
            raw = await read_body(request, cfg.max_request_bytes)
            job = await asyncio.get_running_loop().run_in_executor(
                ctx.text_pool, make, ctx, request, raw)
            gen = start(ctx, job)
        except p.APIError as e:
            ctx.metrics.requests.inc(endpoint=kind, status=str(e.status))
            if e.status >= 500:
                log.warning("rejected request: %s", e.message)
            return _error(e)
        except ClientDisconnect:  # gone mid-upload: nobody to answer, nothing was submitted
            ctx.metrics.requests.inc(endpoint=kind, status="cancelled")
            return Response(status_code=499)
        except Exception:
            ctx.metrics.requests.inc(endpoint=kind, status="500")
            return internal(request.url.path)
        if job.stream:
            return StreamingResponse(run_stream(ctx, job, gen), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await run_full(ctx, job, gen, request.is_disconnected))
        except p.APIError as e:
            return _error(e)
        except Exception:
            return internal(request.url.path)

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

    add_native_routes(app, ctx, flush_cache)

    @app.get("/metrics")
    async def metrics() -> Response:
        for w in ctx.client.workers:
            ok = w.alive and time.monotonic() - w.last_pong <= cfg.health_timeout_s
            ctx.metrics.set_worker(w.wid, w.stats, ok)
        ctx.metrics.set_router(waiting=ctx.client.num_waiting,
                               in_flight=len(ctx.client.requests))
        return PlainTextResponse(ctx.metrics.registry.render(),
                                 media_type="text/plain; version=0.0.4")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # 404 / 405 from routing, in the same OpenAI shape as every other error.
        msg = {404: f"No such endpoint: {request.method} {request.url.path}",
               405: f"Method {request.method} is not allowed on {request.url.path}"}.get(
                   exc.status_code, str(exc.detail))
        return _error(p.APIError(exc.status_code, msg), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error(p.bad_request(f"Invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception) -> Response:
        return internal(request.url.path)

    return app
