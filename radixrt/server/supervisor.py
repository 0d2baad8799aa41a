"""Worker processes: spawn, watch, restart. One owner for every worker process of a server.

The router's monitor task calls ``poll()`` on a timer. A worker is replaced when its process
exits (crash, ``kill -9``, fatal engine error) or when it stops answering for
``worker_hang_timeout_s`` (a hung step: it is SIGKILLed first). Restarts back off exponentially
and are limited to ``max_worker_restarts`` per worker within ``RESTART_WINDOW_S``; past that the
worker stays dead and the router reports it. Every exited child is waited for (no zombies).

The config reaches workers through a 0600 file in the server's 0700 private directory, never
through argv: ``/proc/PID/cmdline`` is readable by every local user, and the config holds the
API keys.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from radixrt.server.config import ServerConfig

log = logging.getLogger("radixrt.router")

CONFIG_FILE = "server_config.json"
RESTART_WINDOW_S = 600.0
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def write_private_config(cfg: ServerConfig, private_dir: str) -> str:
    """The config as JSON in ``private_dir`` (mode 0600, created exclusively)."""
    path = os.path.join(private_dir, CONFIG_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(cfg.to_json())
    return path


def backoff_s(recent_restarts: int) -> float:
    """Delay before the next restart, given how many happened within the window."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2 ** recent_restarts)) if recent_restarts else 0.0


@dataclass(eq=False)
class WorkerProcess:
    wid: int
    proc: subprocess.Popen[bytes] | None = None
    state: str = "starting"  # starting | ready | restarting | dead
    restarts: list[float] = field(default_factory=list)  # times of restarts (monotonic)
    restart_at: float | None = None  # when "restarting": spawn at this time
    started_at: float = 0.0
    death: str | None = None  # why the last incarnation ended

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Supervisor:
    """Owns the worker processes. ``on_death(wid, why)`` is called once per incarnation that
    ends after it became ready, before any replacement is spawned."""

    def __init__(self, cfg: ServerConfig, private_dir: str,
                 on_death: Callable[[int, str], None]) -> None:
        self.cfg = cfg
        self.private_dir = private_dir
        self.config_path = write_private_config(cfg, private_dir)
        self.on_death = on_death
        self.workers = [WorkerProcess(i) for i in range(cfg.dp)]

    # ----------------------------------------------------------------- spawning

    def command(self, wid: int) -> list[str]:
        return [sys.executable, "-m", "radixrt.server.worker", "--worker-id", str(wid),
                "--ipc-dir", self.private_dir, "--config-file", self.config_path]

    def spawn(self, wid: int) -> None:
        # Must run on the main thread: the worker's parent-death signal (PR_SET_PDEATHSIG)
        # fires when the *thread* that forked it exits, not only the process.
        w = self.workers[wid]
        w.proc = subprocess.Popen(self.command(wid))
        w.state, w.started_at, w.restart_at = "starting", time.monotonic(), None
        log.info("started worker %d (pid %d)", wid, w.proc.pid)

    def spawn_all(self) -> None:
        for w in self.workers:
            self.spawn(w.wid)

    def mark_ready(self, wid: int, pid: int) -> bool:
        """A ReadyMsg arrived; False if it is from an earlier incarnation."""
        w = self.workers[wid]
        if w.pid != pid or w.state != "starting":
            return False
        w.state = "ready"
        return True

    def is_current(self, wid: int, pid: int) -> bool:
        return self.workers[wid].pid == pid

    # ----------------------------------------------------------------- watching

    def will_serve_again(self) -> bool:
        """Some worker will take requests again: it is loading, or due for a restart (or it
        reported a fatal error and its process has yet to be seen exiting)."""
        return any(w.state != "dead" for w in self.workers)

    def why_unavailable(self, last_heard: list[float], now: float) -> str:
        reasons = []
        for w in self.workers:
            if w.state == "dead":
                reasons.append(f"worker {w.wid} is dead: {w.death}")
            elif w.state in ("restarting", "starting") and w.death:
                reasons.append(f"worker {w.wid} is restarting after: {w.death}")
            else:
                reasons.append(f"worker {w.wid} has not answered for "
                               f"{now - last_heard[w.wid]:.1f}s")
        return "; ".join(reasons)

    def startup_failure(self) -> str | None:
        """During the initial start: why a worker is gone (None while all are alive)."""
        for w in self.workers:
            code = w.proc.poll() if w.proc is not None else None
            if code is not None:
                return f"worker {w.wid} {describe_exit(code)} during startup"
        return None

    def poll(self, last_heard: list[float], restart: bool = True) -> None:
        """Notice exits and hangs, spawn due replacements. ``last_heard[wid]``: when the router
        last got any message from that worker (monotonic)."""
        now = time.monotonic()
        for w in self.workers:
            if w.state in ("ready", "starting"):
                code = w.proc.poll() if w.proc is not None else None
                if code is not None:
                    self._ended(w, f"process {w.pid} {describe_exit(code)}", restart)
                elif w.state == "ready" and now - last_heard[w.wid] > self.cfg.worker_hang_timeout_s:
                    self._kill(w)
                    self._ended(w, f"hung: no heartbeat for {now - last_heard[w.wid]:.1f}s "
                                   f"(--worker-hang-timeout {self.cfg.worker_hang_timeout_s:g}); "
                                   "killed", restart)
                elif (w.state == "starting" and w.restarts
                      and now - w.started_at > self.cfg.worker_start_timeout_s):
                    self._kill(w)
                    self._ended(w, f"not ready after {self.cfg.worker_start_timeout_s:g}s; killed",
                                restart)
            if w.state == "restarting" and w.restart_at is not None and now >= w.restart_at:
                w.restarts.append(now)
                self.spawn(w.wid)

    def retire(self, wid: int, why: str) -> None:
        """Stop using worker ``wid`` for good (kill and reap it; no restart)."""
        w = self.workers[wid]
        self._kill(w)
        w.state, w.death = "dead", why

    def _kill(self, w: WorkerProcess) -> None:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()  # SIGKILL cannot be ignored: this returns at once, and reaps it

    def _ended(self, w: WorkerProcess, why: str, restart: bool) -> None:
        was_ready = w.state == "ready"
        w.death = why
        now = time.monotonic()
        w.restarts = [t for t in w.restarts if now - t < RESTART_WINDOW_S]
        if not restart or len(w.restarts) >= self.cfg.max_worker_restarts:
            w.state = "dead"
            limit = ("" if not restart else
                     f"; restart limit reached ({self.cfg.max_worker_restarts} within "
                     f"{RESTART_WINDOW_S:.0f}s), not restarting")
            w.death = why + limit
            log.error("worker %d ended: %s%s", w.wid, why, limit)
        else:
            delay = backoff_s(len(w.restarts))
            w.state, w.restart_at = "restarting", now + delay
            log.error("worker %d ended: %s; restarting it in %.1fs", w.wid, why, delay)
        if was_ready or w.state == "dead":
            self.on_death(w.wid, w.death)

    # ----------------------------------------------------------------- stopping

    def stop(self, timeout: float, asked: bool = True) -> None:
        """Wait ``timeout`` for the workers to exit (``asked``: they got a ShutdownReq), then
        TERM, then KILL; reap them all."""
        deadline = time.monotonic() + timeout
        procs = [w.proc for w in self.workers if w.proc is not None]
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if asked:
                    log.warning("worker pid %d did not exit when asked; sending SIGTERM", p.pid)
                p.terminate()
        for p in procs:
            try:
                p.wait(3.0)
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d ignored SIGTERM; killing it", p.pid)
                p.kill()
                p.wait()
        for w in self.workers:
            w.state = "dead"
