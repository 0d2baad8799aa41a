"""Who may call what: bearer keys for tenants and admins, as a plain ASGI middleware.

- ``/health`` is always open (load balancers probe it); ``/metrics`` too unless
  ``metrics_require_key`` (then any valid tenant or admin key).
- Admin endpoints (``/flush_cache`` drops every tenant's cache) need an admin key whenever any
  key is configured: a tenant key gets a 403, no key a 401. A server without keys is open.
- Everything else needs a tenant or admin key when tenant keys are set.

The matched key lands in ``scope["state"]["api_key"]`` (None when none was needed); the cache
namespace is derived from it. Starlette's ``@app.middleware("http")`` would re-stream every
response body through an extra task: on short streamed requests that was the router's largest
cost, hence plain ASGI.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from radixrt.server.errors import APIError

ADMIN_PATHS = frozenset({"/flush_cache", "/reset_prefix_cache"})


def _match(token: str, keys: tuple[str, ...]) -> str | None:
    # compare_digest against every key: the time taken does not tell which one was close.
    found = None
    for k in keys:
        if hmac.compare_digest(k.encode(), token.encode()):
            found = k
    return found


def key_tenant(key: str) -> str:
    """A key's cache namespace part: a hash, so namespaces never carry a secret."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, keys: tuple[str, ...], admin_keys: tuple[str, ...] = (),
                 metrics_require_key: bool = False) -> None:
        self.app, self.keys, self.admin_keys = app, keys, admin_keys
        self.metrics_require_key = metrics_require_key

    async def _deny(self, e: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["api_key"] = None
        path = scope["path"]
        if path == "/health" or not (self.keys or self.admin_keys):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"]
                       if k == b"authorization"), "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        admin = _match(token, self.admin_keys) if token else None
        tenant = _match(token, self.keys) if token and admin is None else None
        if path in ADMIN_PATHS:
            needed = True
            if admin is None and tenant is not None:
                await self._deny(APIError(403, f"{path} needs an admin key (--admin-api-key); "
                                          "a tenant key may not act on every tenant's cache"),
                                 scope, receive, send)
                return
            ok = admin is not None
        else:
            needed = bool(self.keys) or (path == "/metrics")
            if path == "/metrics" and not self.metrics_require_key:
                needed = False
            ok = admin is not None or tenant is not None
        if needed and not ok:
            await self._deny(APIError(401, "Invalid or missing API key (send 'Authorization: "
                                      "Bearer <key>')", None, "invalid_api_key"),
                             scope, receive, send)
            return
        state["api_key"] = admin or tenant
        await self.app(scope, receive, send)
