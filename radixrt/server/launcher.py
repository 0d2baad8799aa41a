"""Start a server: private socket dir, worker processes, router + uvicorn; clean up on exit.

This process is the router. Workers are plain subprocesses (``python -m
radixrt.server.worker``) handed the config as JSON: no pickled state crosses a process
boundary. SIGTERM / SIGINT: uvicorn stops accepting and waits up to shutdown_timeout_s for
in-flight responses, then we abort what is left, stop the workers (terminate, then kill) and
remove the socket directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from types import FrameType

import uvicorn

from radixrt.server.config import ServerConfig
from radixrt.server.engine_client import EngineClient
from radixrt.server.metrics import ServerMetrics
from radixrt.server.protocol import ModelLimits
from radixrt.server.router import build_app
from radixrt.server.serving import ServingContext
from radixrt.server.tokenization import load_codec

log = logging.getLogger("radixrt.router")


class _Server(uvicorn.Server):
    """uvicorn that, on SIGTERM/SIGINT, also ends in-flight generations before its own timeout
    cuts connections: streams then close cleanly with an error event instead of mid-chunk."""

    def __init__(self, config: uvicorn.Config, client: EngineClient, grace_s: float) -> None:
        super().__init__(config)
        self._client = client
        self._grace_s = grace_s
        self._loop = asyncio.get_running_loop()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._loop.call_soon_threadsafe(self._client.begin_shutdown, self._grace_s)
        super().handle_exit(sig, frame)


def spawn_workers(cfg: ServerConfig, ipc_dir: str) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(cfg.dp):
        cmd = [sys.executable, "-m", "radixrt.server.worker", "--worker-id", str(i),
               "--ipc-dir", ipc_dir, "--config", cfg.to_json().decode()]
        procs.append(subprocess.Popen(cmd))
        log.info("started worker %d (pid %d)", i, procs[-1].pid)
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker pid %d ignored SIGTERM; killing it", p.pid)
            p.kill()
            p.wait()


async def _serve(cfg: ServerConfig, ipc_dir: str,
                 procs: list[subprocess.Popen[bytes]]) -> None:
    client = EngineClient(cfg, ipc_dir)
    try:
        procs.extend(spawn_workers(cfg, ipc_dir))
        client.attach(procs)
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
        await server.serve()
        log.info("HTTP server stopped; shutting down workers")
        await client.shutdown(grace_s=min(5.0, cfg.shutdown_timeout_s))
    except BaseException:
        client.close()
        raise


def serve(cfg: ServerConfig) -> int:
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    ipc_dir = tempfile.mkdtemp(prefix="radixrt-ipc-")  # mkdtemp: mode 0700, unique
    os.chmod(ipc_dir, 0o700)
    log.info("IPC socket dir: %s", ipc_dir)
    procs: list[subprocess.Popen[bytes]] = []

    def _term(signum: int, frame: FrameType | None) -> None:
        # Only until uvicorn installs its own handlers (during startup), and after it stops.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    code = 0
    try:
        asyncio.run(_serve(cfg, ipc_dir, procs))
    except (KeyboardInterrupt, SystemExit):
        log.info("interrupted; shutting down")
    except Exception as e:
        log.error("server failed: %s", e)
        code = 1
    finally:
        stop_workers(procs, timeout=5.0)
        shutil.rmtree(ipc_dir, ignore_errors=True)
        log.info("removed %s; bye", ipc_dir)
    return code
