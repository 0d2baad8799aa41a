"""What every job builder needs from a request: its cache namespace and its prompt's ids."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from radixrt.server import protocol as p
from radixrt.server.auth import key_tenant
from radixrt.server.serving import ServingContext


def namespace_of(ctx: ServingContext, request: Request, salt: Any) -> str | None:
    """Cache namespace: the API key's tenant (when keys are set) and the request's cache_salt."""
    parts = []
    key = getattr(request.state, "api_key", None)
    # Several tenant keys always split the cache by key; --salt-from-key does it for one key
    # (and the admin key) too, so a body's cache_salt only partitions within its own key.
    if key is not None and (len(ctx.cfg.api_keys) > 1 or ctx.cfg.salt_from_key):
        parts.append(key_tenant(key))
    s = p.validate_cache_salt(salt)
    if s is not None:
        parts.append("salt:" + s)
    return "|".join(parts) or None


def prompt_ids(ctx: ServingContext, prompt: str | list[int], param: str) -> list[int]:
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


def key_owner(request: Request) -> str | None:
    """Who a request belongs to, for /abort_request: its API key's tenant (None: no keys)."""
    key = getattr(request.state, "api_key", None)
    return None if key is None else key_tenant(key)
