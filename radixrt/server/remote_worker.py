"""``radixrt worker --router tcp://HOST:PORT``: a data-parallel replica on another host.

One EngineCore behind one DEALER socket (CURVE client) connected to the router's
``--remote-listen`` socket; the same WorkerLoop as a local worker, minus the parent watch (the
router is on another host) and plus the rejoin: after a few seconds without a message from the
router this worker aborts what it holds and says Ready again, so it comes back after a network
partition or a router restart. It exits on SIGTERM/SIGINT, on a fatal engine error (after a
WorkerFatal), or when the router refuses it: a wrong key is refused in the CURVE handshake (the
router logs it; this worker sees the handshake fail and exits with code 2 before loading the
model, if the router is up), a wrong model shape or too many workers by a ShutdownReq naming why.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
import uuid

import zmq
from zmq.utils.monitor import recv_monitor_message

from radixrt.server import keys
from radixrt.server import messages as m
from radixrt.server.config import ServerConfig
from radixrt.server.worker import WorkerLoop, _on_term, _Stop

log = logging.getLogger("radixrt.worker")


def _on_int(signum: int, frame: object) -> None:
    raise _Stop


HANDSHAKE_WAIT_S = 10.0  # how long to wait for the router's verdict on our key before loading
EXIT_REFUSED = 2


def handshake(sock: zmq.Socket, wait_s: float) -> bool | None:
    """True once the CURVE handshake succeeded, False if the router refused our key, None if
    neither happened within ``wait_s`` (router not up yet: ZeroMQ keeps reconnecting)."""
    events = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    mon = sock.get_monitor_socket(events)
    try:
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            if not mon.poll(int(left * 1000)):
                return None
            ev = recv_monitor_message(mon)["event"]
            if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
            if ev in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                return False
        return None
    finally:
        sock.disable_monitor()
        mon.close(0)


def run_remote_worker(cfg: ServerConfig, router: str, client_secret: str,
                      server_public: str) -> int:
    if not router.startswith("tcp://"):
        raise ValueError(f"--router must be tcp://HOST:PORT, got {router!r}")
    own = keys.load_pair(client_secret)
    server_key = keys.load_public(server_public)
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s remote-worker %(levelname)s %(message)s")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"rw-" + uuid.uuid4().hex.encode())
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 500)  # last words (WorkerFatal) get a moment, no more
    keys.curve_client(sock, own, server_key)
    sock.connect(router)
    verdict = handshake(sock, HANDSHAKE_WAIT_S)
    if verdict is False:
        log.error("the router at %s refused this worker's CURVE key (is its public key in the "
                  "router's --curve-clients, and --curve-server-public the router's key?)",
                  router)
        sock.close(0)
        ctx.term()
        return EXIT_REFUSED
    if verdict is None:
        log.warning("no answer from the router at %s yet; loading the model and retrying",
                    router)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_int)
    try:
        from radixrt.engine.core import EngineCore
        from radixrt.engine.warmup import freeze_startup_objects

        ecfg = cfg.engine_config()
        core = EngineCore(ecfg)
        freeze_startup_objects()  # as the local worker does (worker.py)
        info = core.model_info
        # worker_id 0: the router rewrites it to this worker's slot.
        ready = m.ReadyMsg(worker_id=0, pid=os.getpid(), model_name=info.model_name,
                           model_path=info.model_path, vocab_size=info.vocab_size,
                           max_context_len=info.max_context_len,
                           eos_token_ids=list(info.eos_token_ids), page_size=ecfg.page_size)
        sock.send(m.encode(ready))
        log.info("remote worker ready (%s); joining %s", info.model_name, router)
        WorkerLoop(core, 0, sock, sock, parent_pid=None, rejoin=ready).run()
        log.info("remote worker: the router asked it to exit")
        return 0
    except _Stop:
        return 0
    except Exception as e:
        log.error("remote worker failed: %s", traceback.format_exc())
        sock.send(m.encode(m.WorkerFatal(0, f"{type(e).__name__}: {e}", os.getpid())))
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sock.close()
        ctx.term()
