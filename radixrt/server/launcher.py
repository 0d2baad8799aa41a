"""Start a server: checks, private dir, worker processes, router + uvicorn; clean up on exit.

This process is the router. Before anything heavy it binds the listening socket and checks the
model path (``preflight``): a busy port or a wrong path exits 1 with one line. Workers are
plain subprocesses (``python -m radixrt.server.worker``) owned by the Supervisor, which hands
them the config as a 0600 file in the private directory: no pickled state, and no secret in
argv, crosses a process boundary.

SIGTERM / SIGINT: uvicorn stops accepting and waits up to shutdown_timeout_s for in-flight
responses (ended with an error event just before that), then the workers are asked to exit
(ShutdownReq; TERM, then KILL, only if they do not) and the private directory is removed.
Every exit path, including failures at start-up, removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Generator
from types import FrameType

import uvicorn

from radixrt.server.config import ServerConfig
from radixrt.server.engine_client import EngineClient
from radixrt.server.metrics import ServerMetrics
from radixrt.server.preflight import (
    StartupError,
    bind_listen_socket,
    check_model,
    check_remote,
)
from radixrt.server.protocol import ModelLimits
from radixrt.server.router import build_app
from radixrt.server.serving import ServingContext
from radixrt.server.tokenization import load_codec

log = logging.getLogger("radixrt.router")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Server(uvicorn.Server):
    """uvicorn that, on SIGTERM/SIGINT, also ends in-flight generations before its own timeout
    cuts connections (streams then close cleanly with an error event instead of mid-chunk), and
    that does not re-raise the signal after serving: the workers are stopped first."""

    def __init__(self, config: uvicorn.Config, client: EngineClient, grace_s: float) -> None:
        super().__init__(config)
        self._client = client
        self._grace_s = grace_s
        self._loop = asyncio.get_running_loop()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info("%s: shutting down", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._client.begin_shutdown, self._grace_s)
        super().handle_exit(sig, frame)


async def _serve(cfg: ServerConfig, ipc_dir: str, sock: socket.socket) -> None:
    client = EngineClient(cfg, ipc_dir)
    try:
        infos = await client.wait_ready(cfg.worker_start_timeout_s)
        info = infos[0]
        codec = await asyncio.to_thread(load_codec, info.model_path, cfg.skip_tokenizer_init)
        if codec is None:
            why = ("--skip-tokenizer-init" if cfg.skip_tokenizer_init
                   else "the model has no tokenizer")
            log.info("serving token ids only (%s): text, chat and stop strings are refused", why)
        default_name: str | None = None
        if cfg.model is None:
            from radixrt.models.default import DEFAULT_MODEL_NAME

            default_name = DEFAULT_MODEL_NAME
        names = tuple(dict.fromkeys(
            n for n in (cfg.served_model_name, default_name, info.model_name, info.model_path,
                        cfg.model) if n))
        limits = ModelLimits(min(i.vocab_size for i in infos),
                             min(i.max_context_len for i in infos), cfg.max_request_tokens)
        ctx = ServingContext(cfg, client, codec, ServerMetrics(), limits, names)
        client.start()
        timeout = max(1, int(cfg.shutdown_timeout_s))
        server = _Server(uvicorn.Config(
            build_app(ctx), host=cfg.host, port=cfg.port, log_level=cfg.log_level,
            timeout_graceful_shutdown=timeout, access_log=cfg.log_level == "debug"),
            client, grace_s=max(0.5, timeout - 1.0))
        log.info("serving %s on http://%s:%d (dp=%d)", names[0], cfg.host, cfg.port, cfg.dp)
        await server.serve(sockets=[sock])
        if not server.started:
            raise StartupError("the HTTP server did not start")
        log.info("HTTP server stopped; shutting down workers")
        await client.shutdown(grace_s=min(5.0, cfg.shutdown_timeout_s))
    finally:
        # Failed start-up or an error: stop whatever was spawned (a no-op after shutdown()).
        client.accepting = False
        await asyncio.to_thread(client.supervisor.stop, 1.0, False)
        client.close()


def serve(cfg: ServerConfig) -> int:
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    try:
        sock = bind_listen_socket(cfg.host, cfg.port)
        check_model(cfg)
        check_remote(cfg)
    except StartupError as e:
        log.error("cannot start: %s", e)
        return 1
    ipc_dir = tempfile.mkdtemp(prefix="radixrt-ipc-")  # mkdtemp: mode 0700, unique
    os.chmod(ipc_dir, 0o700)
    log.info("IPC socket dir: %s", ipc_dir)

    def _term(signum: int, frame: FrameType | None) -> None:
        # Only until uvicorn installs its own handlers (during startup), and after it stops.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    code = 0
    try:
        asyncio.run(_serve(cfg, ipc_dir, sock))
    except KeyboardInterrupt:
        log.info("interrupted during start-up; shutting down")
    except SystemExit as e:
        log.info("signal during start-up; shutting down")
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:
        log.error("server failed: %s", e)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up below must run to its end
        sock.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)
        log.info("removed %s; bye", ipc_dir)
    return code
