"""Remote workers: data-parallel replicas on other hosts that join the router over ZeroMQ TCP.

The router binds one ROUTER socket on ``--remote-listen tcp://HOST:PORT`` as a CURVE server; a
remote worker (``radixrt worker --router tcp://HOST:PORT``) connects a DEALER socket to it as a
CURVE client and says ReadyMsg. Workers dial the router, not the other way round: the router's
address is the one stable, known endpoint (workers come and go, may sit behind NAT, and a new
host joins without restarting or reconfiguring the router), and it is how local workers already
reach the router's PULL socket.

Security: every frame is encrypted and authenticated (CURVE); a ZAP handler admits only client
public keys from the allow-list directory (``--curve-clients``), so a peer without the key is
refused during the handshake and no message of it ever reaches the router. Refusals are logged
and counted (``refused``). There is no plaintext mode.

Identity: each worker process picks a random ZeroMQ identity; the hub maps identities to worker
ids (slots in EngineClient.workers after the local ones) and rewrites ``worker_id`` in what
they send (a remote worker cannot know its slot). A remote worker is supervised like a local
one except that the router cannot restart it: past ``--worker-hang-timeout`` without a message
it is marked dead (its requests get a 503) and its later messages are dropped until it sends a
fresh ReadyMsg, which it does after a few seconds of silence from the router; it then rejoins,
in the same slot if it is the same process.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator

from radixrt.server import keys
from radixrt.server import messages as m
from radixrt.server.config import ServerConfig

if TYPE_CHECKING:
    from radixrt.server.engine_client import EngineClient

log = logging.getLogger("radixrt.router")

ZAP_DOMAIN = "radixrt"


class RemoteSender:
    """``WorkerHandle.sock`` for a remote worker: sends to one identity on the hub's socket.
    Raises zmq.ZMQError (EHOSTUNREACH, ROUTER_MANDATORY) once that peer is disconnected."""

    def __init__(self, sock: zmq.Socket, identity: bytes) -> None:
        self.sock = sock
        self.identity = identity

    def send(self, data: bytes, flags: int = 0) -> None:
        self.sock.send_multipart([self.identity, data], flags)

    def close(self, linger: int | None = None) -> None:
        """The hub owns the socket; one peer's handle closes nothing."""


class _AllowList:
    """ZAP credentials provider: admits exactly the allow-listed client public keys."""

    def __init__(self, allowed: frozenset[bytes]) -> None:
        self.allowed = allowed
        self.refused = 0
        self.refused_keys: dict[bytes, int] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        # Runs on the authenticator's thread; an int increment is atomic enough for a counter.
        ok = key in self.allowed
        if not ok:
            self.refused += 1
            # A refused peer may retry every 100 ms (ZeroMQ reconnects): log the first refusal
            # of a key and then one in 100, not every attempt.
            seen = self.refused_keys.get(key, 0)
            self.refused_keys[key] = seen + 1
            if seen % 100 == 0:
                log.warning("refused a remote worker: CURVE public key %s is not in the "
                            "allow-list (--curve-clients); %d attempts with it so far",
                            key.decode(errors="replace"), seen + 1)
        return ok


class RemoteHub:
    """Owns the TCP socket remote workers join on, its authenticator, and the identity map."""

    def __init__(self, cfg: ServerConfig, client: EngineClient) -> None:
        assert cfg.remote_listen and cfg.curve_server_secret and cfg.curve_clients, \
            "ServerConfig validates that --remote-listen comes with its CURVE keys"
        self.cfg = cfg
        self.client = client
        pair = keys.load_pair(cfg.curve_server_secret)
        self.allow = _AllowList(keys.load_allowed(cfg.curve_clients))
        self.ctx = zmq.Context()
        # Same context as the socket: ZAP is looked up per context, and a CURVE server without
        # a ZAP handler would admit any client.
        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("radixrt.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self.allow)
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone peer raises, never drops
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting peer takes its identity back
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        s.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        s.curve_server = True
        s.curve_secretkey = pair.secret
        s.curve_publickey = pair.public
        try:
            s.bind(cfg.remote_listen)
        except zmq.ZMQError as e:
            s.close(0)
            self.auth.stop()
            self.ctx.term()
            raise RuntimeError(f"cannot listen on {cfg.remote_listen} for remote workers: {e} "
                               "(pick another --remote-listen port)") from None
        self.sock = s
        self.arecv = zmq.asyncio.Socket.from_socket(s)  # same socket, awaited on the loop
        self.endpoint = s.getsockopt_string(zmq.LAST_ENDPOINT)
        self.by_ident: dict[bytes, int] = {}
        self.wids: list[int] = []  # slots in client.workers that are remote
        log.info("remote workers join on %s (CURVE, %d allowed client keys)", self.endpoint,
                 len(self.allow.allowed))

    @property
    def refused(self) -> int:
        return self.allow.refused

    def close(self) -> None:
        self.arecv.close(0)
        self.sock.close(0)
        self.auth.stop()
        self.ctx.term()

    # ------------------------------------------------------------------------- receive

    async def recv_loop(self) -> None:
        while True:
            frames = await self.arecv.recv_multipart()
            if len(frames) != 2:
                log.error("dropping a %d-frame message from a remote worker", len(frames))
                continue
            ident, data = frames
            msg = self.client._decode(data)
            if msg is None:
                continue
            try:
                self._handle(ident, msg)
            except Exception:  # one bad message must not kill the loop
                log.exception("error handling %s from a remote worker", type(msg).__name__)

    def _handle(self, ident: bytes, msg: m.ToRouter) -> None:
        if isinstance(msg, m.ReadyMsg):
            self._join(ident, msg)
            return
        wid = self.by_ident.get(ident)
        if wid is None or not self.client.workers[wid].alive:
            return  # not joined, or marked dead: ignored until a fresh ReadyMsg
        msg = msgspec.structs.replace(msg, worker_id=wid)
        if isinstance(msg, m.WorkerFatal):
            self.client._on_death(wid, f"remote worker fatal error: {msg.message}")
        else:
            self.client._dispatch(msg)

    def _join(self, ident: bytes, msg: m.ReadyMsg) -> None:
        c = self.client
        first = next((w.ready for w in c.workers if w.ready is not None), None)
        if first is not None and (first.vocab_size, first.max_context_len) != (
                msg.vocab_size, msg.max_context_len):
            why = (f"model shape differs (vocab {msg.vocab_size}, context {msg.max_context_len}; "
                   f"the router serves vocab {first.vocab_size}, context "
                   f"{first.max_context_len})")
            log.error("refusing remote worker %s (pid %d): %s", msg.model_name, msg.pid, why)
            self._send_to(ident, m.ShutdownReq(f"refused by the router: {why}"))
            return
        wid = self.by_ident.get(ident)
        if wid is not None and c.workers[wid].alive:
            # The same process says Ready again: it lost the router for a while and aborted
            # what it held; fail those requests here too before taking it back.
            c._on_death(wid, "remote worker re-registered")
        if wid is None:
            free = [i for i in self.wids if not c.workers[i].alive]
            if free:  # a dead slot: whoever held it must send a fresh Ready to come back
                wid = free[0]
                self.by_ident = {k: v for k, v in self.by_ident.items() if v != wid}
            elif len(self.wids) < self.cfg.max_remote_workers:
                wid = c.add_worker(RemoteSender(self.sock, ident), remote=True)
                self.wids.append(wid)
            else:
                log.error("refusing remote worker (pid %d): --max-remote-workers %d reached",
                          msg.pid, self.cfg.max_remote_workers)
                self._send_to(ident, m.ShutdownReq("refused by the router: too many remote "
                                                   "workers (--max-remote-workers)"))
                return
            self.by_ident[ident] = wid
        c.workers[wid].sock = RemoteSender(self.sock, ident)
        log.info("remote worker %d joined (pid %d, %s)", wid, msg.pid, msg.model_name)
        c._on_ready(msgspec.structs.replace(msg, worker_id=wid))

    def _send_to(self, ident: bytes, msg: m.ToWorker) -> None:
        try:
            self.sock.send_multipart([ident, m.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("could not answer a remote worker: %s", str(e))

    # ------------------------------------------------------------------------- supervise

    def check_deadlines(self, now: float) -> None:
        """A remote worker silent past --worker-hang-timeout is dead (it cannot be restarted
        from here); it may rejoin with a fresh ReadyMsg."""
        limit = self.cfg.worker_hang_timeout_s
        for wid in self.wids:
            w = self.client.workers[wid]
            if w.alive and now - w.last_pong > limit:
                self.client._on_death(wid, f"remote worker stopped answering for "
                                      f"{now - w.last_pong:.1f}s (--worker-hang-timeout "
                                      f"{limit:g}); marked dead until it rejoins")

    def describe(self, now: float) -> list[str]:
        """Why each remote slot is not serving, for /health's reason."""
        out = []
        for wid in self.wids:
            w = self.client.workers[wid]
            if not w.alive:
                out.append(f"remote worker {wid} is gone: {w.death}")
            else:
                out.append(f"remote worker {wid} has not answered for {now - w.last_pong:.1f}s")
        return out

