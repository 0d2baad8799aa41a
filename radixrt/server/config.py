"""Server configuration: one frozen, validated dataclass shared by the router and its workers.

Engine knobs left at None fall through to EngineConfig's own defaults, so the server never
duplicates (and drifts from) the engine's choices.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from radixrt.config import EngineConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 30000

# Fields forwarded to EngineConfig when not None.
_ENGINE_FIELDS = (
    "device",
    "dtype",
    "page_size",
    "kv_cache_tokens",
    "host_kv_cache_tokens",
    "schedule_policy",
    "enable_prefix_cache",
    "chunked_prefill_size",
    "max_running_requests",
    "load_format",
    "seed",
    "debug_invariants",
    "attention_backend",
    "prefill_attention",
    "max_context_len",
    "mem_fraction",
    "disable_cuda_graph",
    "cuda_graph_max_batch",
    "piecewise_cuda_graph_max_tokens",
    "overlap_schedule",
    "deterministic_inference",
    "cascade_decode",
    "warmup",
    "tp_size",
    "nnodes",
    "dist_init_addr",
)


@dataclass(frozen=True)
class ServerConfig:
    model: str | None = None  # None = the default model
    served_model_name: str | None = None  # name clients use in "model"; default: the model's
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = ()  # empty = no auth
    dp: int = 1
    max_queued_requests: int = 4096  # requests without a first token yet, router-wide
    max_request_tokens: int | None = None  # cap on max_tokens (default: context window)
    # A worker that has not answered a ping for this long makes /health fail.
    health_timeout_s: float = 20.0
    ping_interval_s: float = 0.5
    worker_start_timeout_s: float = 600.0
    # Supervision: a ready worker silent for this long is hung (SIGKILLed and replaced); a
    # worker that ends is restarted at most max_worker_restarts times per 10 minutes.
    worker_hang_timeout_s: float = 60.0
    max_worker_restarts: int = 5
    request_timeout_s: float | None = None  # per-request deadline, arrival to end; None: none
    shutdown_timeout_s: float = 10.0
    log_level: str = "info"
    # Serve token ids only: load no tokenizer even if the model has one (always the case for
    # models without one, e.g. dummy-weight presets). Text, chat and stop strings get a 400.
    skip_tokenizer_init: bool = False
    # Hostile-input limits (router): checked before a body is parsed or tokenized.
    max_request_bytes: int = 4 * 1024 * 1024  # larger bodies get a 413
    max_json_depth: int = 64  # deeper nesting gets a 400, found without recursing
    max_sequences_per_request: int = 256  # prompts x n of one request
    # A client-supplied chat_template is arbitrary Jinja: off unless asked for, and when on it
    # renders in a child process that is killed after chat_template_timeout_s.
    allow_request_chat_template: bool = False
    chat_template_timeout_s: float = 2.0
    # Tenancy: admin endpoints (/flush_cache) need one of these when any key is set.
    admin_api_keys: tuple[str, ...] = ()
    metrics_require_key: bool = False  # /metrics needs a valid key (tenant or admin)
    salt_from_key: bool = False  # the cache namespace always includes the request's key
    # engine knobs (None = EngineConfig default)
    device: str | None = None
    dtype: str | None = None
    page_size: int | None = None
    kv_cache_tokens: int | None = None
    host_kv_cache_tokens: int | str | None = None  # tokens, or "auto"
    schedule_policy: str | None = None
    enable_prefix_cache: bool | None = None
    chunked_prefill_size: int | None = None
    max_running_requests: int | None = None
    load_format: str | None = None
    seed: int | None = None
    debug_invariants: bool | None = None
    attention_backend: str | None = None
    prefill_attention: str | None = None
    max_context_len: int | None = None
    mem_fraction: float | None = None
    disable_cuda_graph: bool | None = None
    cuda_graph_max_batch: int | None = None
    piecewise_cuda_graph_max_tokens: int | None = None
    overlap_schedule: bool | None = None
    deterministic_inference: bool | None = None
    cascade_decode: str | None = None  # --cascade-decode auto|on|off (shared-prefix decode)
    warmup: bool | None = None  # --skip-warmup: False (default: the engine's, on for CUDA)
    tp_size: int | None = None  # --tp: ranks (GPUs) per replica
    nnodes: int | None = None  # --nnodes: hosts one TP replica spans (this one is node 0)
    dist_init_addr: str | None = None  # --dist-init-addr HOST:PORT: node 0's rendezvous
    # Remote workers (other hosts) join over ZeroMQ TCP with CURVE; see server/remote.py.
    remote_listen: str | None = None  # tcp://HOST:PORT the router binds for them
    curve_server_secret: str | None = None  # the router's key pair file (radixrt keys)
    curve_clients: str | None = None  # directory of allowed client public keys (*.key)
    max_remote_workers: int = 16

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ValueError(
                    f"host must be an IP address or 'localhost', got {self.host!r}") from None
        if not 0 <= self.port <= 65535:  # 0 = let the OS pick (tests)
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not 1 <= self.dp <= 64:
            raise ValueError(f"dp must be in [1, 64], got {self.dp}")
        if self.tp_size is not None and self.tp_size * self.dp > 64:
            raise ValueError(f"tp x dp must be <= 64 ranks, got {self.tp_size} x {self.dp}")
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        if self.max_request_tokens is not None and self.max_request_tokens < 1:
            raise ValueError(f"max_request_tokens must be >= 1, got {self.max_request_tokens}")
        for name in ("health_timeout_s", "ping_interval_s", "worker_start_timeout_s",
                     "shutdown_timeout_s", "worker_hang_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.ping_interval_s >= self.health_timeout_s:
            raise ValueError("ping_interval_s must be smaller than health_timeout_s")
        if self.ping_interval_s >= self.worker_hang_timeout_s:
            raise ValueError("ping_interval_s must be smaller than worker_hang_timeout_s")
        if self.max_worker_restarts < 0:
            raise ValueError(f"max_worker_restarts must be >= 0, got {self.max_worker_restarts}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        for key in self.api_keys:
            if not key or any(c.isspace() for c in key):
                raise ValueError("api keys must be non-empty and contain no whitespace")
        object.__setattr__(self, "admin_api_keys", tuple(self.admin_api_keys))
        for key in self.admin_api_keys:
            if not key or any(c.isspace() for c in key):
                raise ValueError("admin api keys must be non-empty and contain no whitespace")
        if set(self.admin_api_keys) & set(self.api_keys):
            raise ValueError("an admin api key must not also be a tenant api key")
        if (self.metrics_require_key or self.salt_from_key) and not (
                self.api_keys or self.admin_api_keys):
            raise ValueError("metrics_require_key and salt_from_key need api keys "
                             "(--api-key / --admin-api-key)")
        if not 1024 <= self.max_request_bytes <= 2**31:
            raise ValueError(f"max_request_bytes must be in [1024, 2^31], got "
                             f"{self.max_request_bytes}")
        if not 2 <= self.max_json_depth <= 10_000:
            raise ValueError(f"max_json_depth must be in [2, 10000], got {self.max_json_depth}")
        if self.max_sequences_per_request < 1:
            raise ValueError("max_sequences_per_request must be >= 1, got "
                             f"{self.max_sequences_per_request}")
        if not self.chat_template_timeout_s > 0:
            raise ValueError(f"chat_template_timeout_s must be > 0, got "
                             f"{self.chat_template_timeout_s}")
        if (self.nnodes or 1) > 1 and self.dp != 1:
            raise ValueError("--nnodes > 1 spreads one replica over hosts: it needs --dp 1 "
                             "(add replicas as remote workers)")
        if self.remote_listen is not None:
            if not self.remote_listen.startswith("tcp://"):
                raise ValueError(f"remote_listen must be tcp://HOST:PORT, got "
                                 f"{self.remote_listen!r}")
            if not (self.curve_server_secret and self.curve_clients):
                raise ValueError("--remote-listen needs --curve-server-secret and --curve-clients "
                                 "(remote workers are always authenticated; see radixrt keys)")
        elif self.curve_server_secret or self.curve_clients:
            raise ValueError("--curve-server-secret / --curve-clients need --remote-listen")
        if not 1 <= self.max_remote_workers <= 256:
            raise ValueError(f"max_remote_workers must be in [1, 256], got "
                             f"{self.max_remote_workers}")
        if self.log_level not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(f"log_level must be a logging level name, got {self.log_level!r}")

    def engine_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.model}
        for name in _ENGINE_FIELDS:
            v = getattr(self, name)
            if v is not None:
                kw[name] = v
        return kw

    def engine_config(self) -> EngineConfig:
        from radixrt.config import EngineConfig  # the engine is only imported in workers

        return EngineConfig(**self.engine_kwargs())

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> ServerConfig:
        return msgspec.json.decode(data, type=cls)

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)
