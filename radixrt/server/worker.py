"""Worker process main: one EngineCore behind two ZeroMQ ipc sockets.

Loop: drain incoming messages (without blocking while there is work; polling with a timeout
when idle), run one scheduler step, send one TokenBatch with every sequence's new tokens.

One request's failure is that request's: an exception from ``add_request`` rejects only that
request, and EngineCore turns a failed step into error results for the requests it held. Only
what EngineCore re-raises (device-level faults, broken invariants) ends the worker, after a
WorkerFatal naming it; the router then restarts the worker.

Exits: a ShutdownReq (the normal path), SIGTERM (the same, from a signal), or the router's death
(PR_SET_PDEATHSIG delivers SIGTERM, and the loop also polls getppid); the last one also removes
the server's private directory, which the dead router can no longer do. A watchdog timer started
by SIGTERM ends the process even if the clean path stalls (e.g. inside a long kernel).

Run as ``python -m radixrt.server.worker --worker-id I --ipc-dir DIR --config-file FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from types import FrameType
from typing import TYPE_CHECKING

import msgspec
import zmq

from radixrt.server import messages as m
from radixrt.server.config import ServerConfig

if TYPE_CHECKING:
    from radixrt.engine.core import EngineCore

log = logging.getLogger("radixrt.worker")

IDLE_POLL_MS = 50
# While busy, still send a stats snapshot at least this often (for /metrics).
STATS_EVERY_S = 0.5
# After SIGTERM the clean exit must finish within this, or the default SIGALRM action ends it.
TERM_WATCHDOG_S = 1.5
_PR_SET_PDEATHSIG = 1
# A remote worker that hears nothing from the router for this long says Ready again (the
# router pings every ping_interval_s, 0.5 s by default).
REJOIN_AFTER_S = 5.0


def to_worker_addr(ipc_dir: str, worker_id: int) -> str:
    return f"ipc://{os.path.join(ipc_dir, f'to_worker_{worker_id}')}"


def to_router_addr(ipc_dir: str) -> str:
    return f"ipc://{os.path.join(ipc_dir, 'to_router')}"


class _Stop(BaseException):
    """Exit cleanly (SIGTERM, or the router is gone). BaseException: no ``except Exception``
    on the way up may swallow it."""


class _Shutdown(_Stop):
    """The router asked this worker to exit."""


def router_gone(parent_pid: int, wait_s: float) -> bool:
    """Whether the router has exited, waiting up to ``wait_s`` to be sure: the death signal
    comes when the router's forking thread exits, before its other threads are gone and this
    process is re-parented, so getppid() may still name the router for a moment."""
    deadline = time.monotonic() + wait_s
    while os.getppid() == parent_pid and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getppid() != parent_pid


class WorkerLoop:
    def __init__(self, core: EngineCore, worker_id: int, pull: zmq.Socket, push: zmq.Socket,
                 parent_pid: int | None, rejoin: m.ReadyMsg | None = None) -> None:
        """``parent_pid``: exit when it is no longer our parent (None: a remote worker, whose
        router is on another host). ``rejoin``: say this Ready again after REJOIN_AFTER_S
        without a message from the router (it restarted, or marked us dead), aborting what we
        hold first: the router failed those requests when it lost us."""
        self.core = core
        self.worker_id = worker_id
        self.pull = pull
        self.push = push
        self.parent_pid = parent_pid
        self.step_no = 0
        self.last_stats = 0.0
        self.poller = zmq.Poller()
        self.poller.register(pull, zmq.POLLIN)
        self.rejoin = rejoin
        self.last_heard = time.monotonic()
        self.rids: set[str] = set()  # requests held, tracked only to abort them on a rejoin

    def send(self, msg: m.ToRouter) -> None:
        self.push.send(m.encode(msg), copy=False)

    def stats(self) -> m.StatsMsg:
        self.last_stats = time.monotonic()
        return m.stats_to_msg(self.core.stats())

    def run(self) -> None:
        """Serve until told to stop (returns); raises _Stop on SIGTERM or if the router is gone."""
        try:
            while True:
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    raise _Stop
                if self.core.has_work() or self.poller.poll(IDLE_POLL_MS):
                    self._drain()
                if (self.rejoin is not None
                        and time.monotonic() - self.last_heard > REJOIN_AFTER_S):
                    self._say_ready_again()
                if self.core.has_work():
                    self._step()
        except _Shutdown:
            return

    def _say_ready_again(self) -> None:
        assert self.rejoin is not None, "only a remote worker rejoins"
        for rid in self.rids:
            with contextlib.suppress(KeyError, ValueError):
                self.core.abort_request(rid)
        self.rids.clear()
        log.warning("no message from the router for %.0fs; saying Ready again", REJOIN_AFTER_S)
        self.send(self.rejoin)
        self.last_heard = time.monotonic()

    def _drain(self) -> None:
        while True:
            try:
                data = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.last_heard = time.monotonic()
            try:
                msg = m.decode_to_worker(data)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                # A request whose params fail validation is answered if its rid is readable.
                log.error("worker %d: rejecting malformed message: %s", self.worker_id, e)
                self._reject_malformed(data, str(e))
                continue
            self._handle(msg)

    def _reject_malformed(self, data: bytes, why: str) -> None:
        try:
            raw = msgspec.msgpack.decode(data)
        except msgspec.DecodeError:
            return
        if isinstance(raw, dict) and raw.get("type") == "GenerateReq" and isinstance(
                raw.get("rid"), str):
            self.send(m.RequestError(self.worker_id, raw["rid"], why))

    def _handle(self, msg: m.ToWorker) -> None:
        if isinstance(msg, m.GenerateReq):
            if self.rejoin is not None:
                self.rids.add(msg.rid)
            try:
                self.core.add_request(msg.rid, msg.input_ids, msg.params, msg.namespace)
            except ValueError as e:
                self.send(m.RequestError(self.worker_id, msg.rid, str(e)))
            except Exception as e:  # e.g. a seed the RNG refuses: this request only
                log.warning("worker %d: request %s refused: %r", self.worker_id, msg.rid, e)
                self.send(m.RequestError(self.worker_id, msg.rid,
                                         f"the engine cannot run this request: "
                                         f"{type(e).__name__}: {e}"))
        elif isinstance(msg, m.AbortReq):
            # KeyError/ValueError: already finished; the abort crossed its last batch on the wire
            with contextlib.suppress(KeyError, ValueError):
                self.core.abort_request(msg.rid, msg.index)
        elif isinstance(msg, m.PingReq):
            self.core.check_peers()  # a dead TP rank ends this worker even while it is idle
            self.send(m.PongMsg(self.worker_id, msg.seq, self.stats()))
        elif isinstance(msg, m.FlushCacheReq):
            self.send(m.FlushCacheResp(self.worker_id, msg.seq, bool(self.core.flush_cache())))
        elif isinstance(msg, m.ShutdownReq):
            log.info("worker %d: shutdown requested (%s)", self.worker_id, msg.reason)
            raise _Shutdown
        else:  # pragma: no cover - the decoder only yields the union's members
            raise AssertionError(f"unhandled message {type(msg).__name__}")

    def _step(self) -> None:
        deltas = self.core.step_isolating_faults()
        self.step_no += 1
        out = [m.delta_to_msg(d) for d in deltas]
        if self.rids:
            self.rids.difference_update(d.rid for d in deltas if d.finished)
        idle = not self.core.has_work()
        want_stats = (idle or any(d.finished for d in deltas)
                      or time.monotonic() - self.last_stats > STATS_EVERY_S)
        if out or want_stats:
            self.send(m.TokenBatch(self.worker_id, self.step_no, out,
                                   self.stats() if want_stats else None))


def _engine_config(cfg: ServerConfig, worker_id: int) -> ServerConfig:
    # One GPU per replica (tp GPUs with --tp: replica w's ranks on GPUs w*tp .. w*tp+tp-1);
    # on CPU, split the cores between replicas.
    if cfg.dp > 1 and cfg.device == "cuda":
        return cfg.replace(device=f"cuda:{worker_id * (cfg.tp_size or 1)}")
    return cfg


def die_with_parent() -> None:
    """Ask Linux for SIGTERM when the router dies (no-op elsewhere; getppid polling remains)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _on_term(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, TERM_WATCHDOG_S)  # a backstop, not the normal path
    raise _Stop


def read_config(path: str) -> ServerConfig:
    with open(path, "rb") as f:
        return ServerConfig.from_json(f.read())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="radixrt.server.worker")
    ap.add_argument("--worker-id", type=int, required=True)
    ap.add_argument("--ipc-dir", required=True)
    ap.add_argument("--config-file", required=True,
                    help="ServerConfig as JSON, in the server's private directory (mode 0600)")
    args = ap.parse_args(argv)
    parent = os.getppid()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 500)  # last words (WorkerFatal) get a moment, no more
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(to_router_addr(args.ipc_dir))
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.connect(to_worker_addr(args.ipc_dir, args.worker_id))
    # Ctrl-C reaches the whole process group; the router decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term)
    die_with_parent()
    orphaned = False
    try:  # from here on every exit, SIGTERM included, goes through the clean-up below
        if os.getppid() != parent:  # the router died before the death signal was armed
            raise _Stop
        cfg = read_config(args.config_file)
        logging.basicConfig(level=cfg.log_level.upper(),
                            format=f"%(asctime)s worker{args.worker_id} %(levelname)s %(message)s")
        if (cfg.device or "cpu") == "cpu":
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.dp))
        from radixrt.engine.core import EngineCore
        from radixrt.engine.warmup import freeze_startup_objects

        ecfg = _engine_config(cfg, args.worker_id).engine_config()
        core = EngineCore(ecfg)
        # Start-up leaves millions of long-lived objects (modules, weights' wrappers, the
        # tokenizer); moving them out of the collector's generations keeps full collections
        # during serving from scanning them (they gave 14-330 ms host spikes at 256 x 128k).
        freeze_startup_objects()
        info = core.model_info
        push.send(m.encode(m.ReadyMsg(
            worker_id=args.worker_id, pid=os.getpid(), model_name=info.model_name,
            model_path=info.model_path, vocab_size=info.vocab_size,
            max_context_len=info.max_context_len, eos_token_ids=list(info.eos_token_ids),
            page_size=ecfg.page_size)))
        log.info("worker %d ready: %s", args.worker_id, info.model_name)
        WorkerLoop(core, args.worker_id, pull, push, parent).run()
        return 0
    except _Stop:
        orphaned = router_gone(parent, wait_s=0.5)
        if orphaned:
            log.warning("worker %d: router process is gone; exiting", args.worker_id)
        return 0
    except Exception as e:
        log.error("worker %d failed: %s", args.worker_id, traceback.format_exc())
        push.send(m.encode(m.WorkerFatal(args.worker_id, f"{type(e).__name__}: {e}",
                                         os.getpid())))
        return 1
    finally:
        # The process is on its way out: a TERM now would only interrupt the clean-up.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if orphaned:  # nobody else is left to remove the private directory
            shutil.rmtree(args.ipc_dir, ignore_errors=True)
            push.setsockopt(zmq.LINGER, 0)
        pull.close(0)
        push.close()
        ctx.term()


def _exit(code: int) -> None:
    # Skip the interpreter's teardown (torch's, mostly): everything this process owns is closed
    # by now, and a slow teardown would only delay the router's wait for it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
