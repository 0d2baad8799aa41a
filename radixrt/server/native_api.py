"""SGLang's (and vLLM's) native endpoints, as SGLang's frontend and benchmark clients use them:

    POST /generate            one prompt or a batch; SGLang's sampling keys and logprob fields
    GET  /get_model_info      model path, chat template and special tokens (a remote DSL
                              program renders role blocks from them, with no local tokenizer)
    GET  /server_info         configuration (no secrets) and per-worker engine stats
         (/get_server_info)
    GET  /v1/models/{id}      one model, or an OpenAI-style 404
    POST /abort_request       end requests by their ``rid`` (or all of the caller's)
    POST /reset_prefix_cache  vLLM's name for /flush_cache (admin, like it)
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import radixrt
from radixrt.server import native_protocol as native
from radixrt.server import protocol as p
from radixrt.server import structured
from radixrt.server.body import read_body
from radixrt.server.job_inputs import key_owner, namespace_of, prompt_ids
from radixrt.server.serving import Job, ServingContext

# Never reported by /server_info: keys and key material.
_SECRET_FIELDS = frozenset({"api_keys", "admin_api_keys", "curve_server_secret",
                            "curve_clients"})
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default for /generate


def generate_job(ctx: ServingContext, request: Request, raw: bytes) -> Job:
    req = p.parse_body(raw, p.GenerateRequest, ctx.cfg.max_json_depth)
    items, batched = native.prompts(req)
    namespace = namespace_of(ctx, request, req.cache_salt)
    params_list, prompts = [], []
    for item in items:
        params, asked = native.sampling_params(item.sampling)
        if ctx.codec is None:
            p.check_token_only(params)
        structured.check_grammar(params)
        ids = prompt_ids(ctx, item.prompt, item.param)
        params = _with_logprobs(params, item.logprobs, len(ids))
        params_list.append(p.finalize_params(params, len(ids), asked, ctx.limits,
                                             DEFAULT_MAX_NEW_TOKENS, allow_zero=True))
        prompts.append(ids)
    p.check_sequences(1, sum(sp.n for sp in params_list), ctx.cfg.max_sequences_per_request)
    rids = [item.rid or uuid.uuid4().hex for item in items]
    return Job("generate", prompts, params_list[0], namespace, req.stream,
               timeout_s=p.request_timeout(req.timeout), batched=batched,
               params_list=params_list, rids=rids,
               logprob_options=[item.logprobs for item in items], owner=key_owner(request))


def _with_logprobs(params: Any, opt: native.LogprobOptions | None, prompt_len: int) -> Any:
    """SGLang's return_logprob options as engine params: output logprobs (+ top-k), and prompt
    logprobs from logprob_start_len + 1 on (the window's first row has none, as in SGLang;
    the tokens before it may come from the prefix cache)."""
    if opt is None:
        return params
    if opt.start is not None and opt.start > prompt_len:
        raise p.bad_request(f"logprob_start_len ({opt.start}) is past the end of the prompt "
                            f"({prompt_len} tokens)", "logprob_start_len")
    kw: dict[str, Any] = {"logprobs": True, "top_logprobs": opt.top_k}
    if opt.start is not None and opt.start + 1 < prompt_len:
        kw.update(prompt_logprobs=True, logprob_start_len=opt.start + 1,
                  prompt_top_logprobs=opt.top_k)
    try:
        return p.with_params(params, **kw)
    except p.APIError as e:  # name the field the client sent
        if e.param in ("top_logprobs", "prompt_top_logprobs"):
            raise p.bad_request(e.message.replace(e.param, "top_logprobs_num", 1),
                                "top_logprobs_num") from None
        raise


class AbortRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    rid: str | list[str] | None = None
    abort_all: bool = False


def model_info(ctx: ServingContext) -> dict[str, Any]:
    ready = next((w.ready for w in ctx.client.workers if w.ready is not None), None)
    path = ctx.cfg.model or (ready.model_path if ready is not None else None) or ctx.model_name
    tok = ctx.codec.tokenizer if ctx.codec is not None else None
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    specials = {k: v for k, v in (getattr(tok, "special_tokens_map", None) or {}).items()
                if isinstance(v, str)}
    return {"model_path": path, "tokenizer_path": path if tok is not None else None,
            "is_generation": True, "served_model_name": ctx.model_name,
            "max_context_len": ctx.limits.max_context_len, "vocab_size": ctx.limits.vocab_size,
            "chat_template": template if isinstance(template, str) else None,
            "bos_token": specials.get("bos_token"), "eos_token": specials.get("eos_token"),
            "special_tokens": specials, "has_image_understanding": False,
            "has_audio_understanding": False, "preferred_sampling_params": None,
            "weight_version": "default"}


def server_info(ctx: ServingContext) -> dict[str, Any]:
    cfg = {f.name: getattr(ctx.cfg, f.name) for f in dataclasses.fields(ctx.cfg)
           if f.name not in _SECRET_FIELDS}
    states = [{"worker_id": w.wid, "alive": w.alive, "remote": w.remote,
               **(msgspec.structs.asdict(w.stats) if w.stats is not None else {})}
              for w in ctx.client.workers]
    return {**cfg, "version": radixrt.__version__, "served_model_names": list(ctx.served_names),
            "max_context_len": ctx.limits.max_context_len, "internal_states": states}


def add_native_routes(app: FastAPI, ctx: ServingContext,
                      flush: Any) -> None:
    """``flush``: the /flush_cache handler, which /reset_prefix_cache shares."""

    @app.get("/get_model_info")
    async def get_model_info() -> Response:
        return JSONResponse(model_info(ctx))

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def get_server_info() -> Response:
        return JSONResponse(server_info(ctx))

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str) -> Response:
        if model_id not in ctx.served_names:
            e = p.APIError(404, f"The model `{model_id}` does not exist", "model",
                           "invalid_request_error")
            return JSONResponse(e.body(), status_code=404)
        return JSONResponse({"id": model_id, "object": "model", "created": int(time.time()),
                             "owned_by": "radixrt",
                             "max_model_len": ctx.limits.max_context_len})

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        return await flush()  # type: ignore[no-any-return]

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        try:
            raw = await read_body(request, ctx.cfg.max_request_bytes)
            req = p.parse_body(raw, AbortRequest, ctx.cfg.max_json_depth)
        except p.APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        if req.rid is None and not req.abort_all:
            err = p.bad_request("give rid (a string or a list) or abort_all: true", "rid")
            return JSONResponse(err.body(), status_code=400)
        owner = key_owner(request)
        admin = request.state.api_key is not None and \
            request.state.api_key in ctx.cfg.admin_api_keys
        wanted = {req.rid} if isinstance(req.rid, str) else set(req.rid or [])
        done = []
        # A tenant only reaches its own requests; an admin (or a keyless server) all.
        for (who, rid), entry in list(ctx.active.items()):
            gen = entry.gen
            if gen is not None and (admin or who == owner) and (req.abort_all or rid in wanted):
                gen.abort_by_client(entry.engine_rid)
                done.append(rid)
        return JSONResponse({"aborted": done})
