"""The router's side of the IPC: worker handles, request bookkeeping, routing, health.

All of it runs on the router's asyncio loop. Sends use plain (synchronous) ZeroMQ sockets with
NOBLOCK and no high-water mark, so they never wait and can run anywhere, including in the
``finally`` of a cancelled stream (that is how a client disconnect becomes an abort). One
receive task decodes worker messages and fans each step's deltas out to per-request queues; one
monitor task pings workers, lets the Supervisor replace dead or hung ones, and ends requests
past their deadline.

Every request holds one queue slot (``num_waiting``) from ``submit`` until its first token or
its release, whichever comes first; every path out of ``submit`` that raises takes none.
A request submitted while no worker can take it but one is being restarted waits (still holding
its slot) and is sent when a worker is ready again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
import weakref

import msgspec
import zmq
import zmq.asyncio

from radixrt.sampling_params import SamplingParams
from radixrt.server import messages as m
from radixrt.server.client_state import (
    PENDING,
    Event,
    FlushAcks,
    RequestRejected,
    RequestState,
    RequestTimeout,
    Sender,
    WorkerFailure,
    WorkerHandle,
)
from radixrt.server.config import ServerConfig
from radixrt.server.protocol import APIError
from radixrt.server.remote import RemoteHub
from radixrt.server.routing import PrefixRouter
from radixrt.server.supervisor import Supervisor
from radixrt.server.worker import to_router_addr, to_worker_addr

log = logging.getLogger("radixrt.router")

__all__ = ["PENDING", "EngineClient", "Event", "RequestRejected", "RequestState",
           "RequestTimeout", "WorkerFailure", "WorkerHandle"]

class EngineClient:
    def __init__(self, cfg: ServerConfig, ipc_dir: str) -> None:
        self.cfg = cfg
        self._sync_ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        self.pull = self._actx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 0)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(to_router_addr(ipc_dir))
        self.workers: list[WorkerHandle] = []
        for i in range(cfg.dp):
            s = self._sync_ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(to_worker_addr(ipc_dir, i))
            self.workers.append(WorkerHandle(i, s))
        self.supervisor = Supervisor(cfg, ipc_dir, self._on_death)
        self.requests: dict[str, RequestState] = {}
        self.pending: dict[str, None] = {}  # rids waiting for a ready worker, in arrival order
        self.num_waiting = 0  # submitted, no token yet: what --max-queued-requests bounds
        self.accepting = True
        self.router: PrefixRouter | None = None
        self._seq = itertools.count(1)
        self._flushes = FlushAcks()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.remote: RemoteHub | None = None
        if cfg.remote_listen:
            try:
                self.remote = RemoteHub(cfg, self)
            except BaseException:  # e.g. the port is taken: close what is open, then fail
                self.close()
                raise

    def add_worker(self, sock: Sender, remote: bool) -> int:
        """A new worker slot (a remote worker joining); its id."""
        wid = len(self.workers)
        self.workers.append(WorkerHandle(wid, sock, remote=remote))
        if self.router is not None:
            self.router.add_worker()
        return wid

    # ------------------------------------------------------------------------- lifecycle

    async def wait_ready(self, timeout: float) -> list[m.ReadyMsg]:
        self.supervisor.spawn_all()
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self.workers):
            why = self.supervisor.startup_failure()
            if why is not None:
                raise RuntimeError(why)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"workers not ready after {timeout:.0f}s")
            if await self.pull.poll(int(min(left, 0.2) * 1000)):
                msg = self._decode(await self.pull.recv())
                if isinstance(msg, m.WorkerFatal):
                    raise RuntimeError(f"worker {msg.worker_id} failed to start: {msg.message}")
                if isinstance(msg, m.ReadyMsg):
                    self._on_ready(msg)
        infos = [w.ready for w in self.workers if w.ready]
        per_worker_tokens = max(4096, (infos[0].max_context_len * 8))
        self.router = PrefixRouter(len(self.workers), per_worker_tokens)
        return infos

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._recv_loop(), name="radixrt-recv"),
                       asyncio.create_task(self._monitor_loop(), name="radixrt-monitor")]
        if self.remote is not None:
            self._tasks.append(asyncio.create_task(self.remote.recv_loop(), name="radixrt-remote"))

    def begin_shutdown(self, grace_s: float) -> None:
        """Stop accepting now; end what is still running after ``grace_s`` with an error."""
        self.accepting = False
        asyncio.get_running_loop().call_later(grace_s, self.fail_all, "server is shutting down")

    def fail_all(self, why: str) -> None:
        for st in list(self.requests.values()):
            self._post(st, WorkerFailure(why))
            self.abort(st.rid)

    async def shutdown(self, grace_s: float) -> None:
        """Abort what is left, ask workers to exit, then make sure they did (and reap them)."""
        self.accepting = False
        self.fail_all("server is shutting down")
        for t in self._tasks:  # no more pings, and no restarts from here on
            t.cancel()
        for w in self.workers:  # remote workers stay up and rejoin a restarted router
            if not w.remote:
                self._send(w, m.ShutdownReq("router shutdown"), quiet=True)
        await asyncio.to_thread(self.supervisor.stop, grace_s)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self.workers:
            w.sock.close(0)
        self.pull.close(0)
        if self.remote is not None:
            self.remote.close()
        self._sync_ctx.term()
        self._actx.term()

    # ------------------------------------------------------------------------- health

    def healthy(self) -> tuple[bool, str]:
        """Healthy while at least one worker takes requests (the others are being replaced)."""
        if not self.accepting:
            return False, "server is shutting down"
        now = time.monotonic()
        if any(w.alive and now - w.last_pong <= self.cfg.health_timeout_s for w in self.workers):
            return True, "ok"
        why = self.supervisor.why_unavailable([w.last_pong for w in self.workers], now)
        return False, "; ".join([why, *(self.remote.describe(now) if self.remote else [])])

    def _can_recover(self) -> bool:
        return self.accepting and self.supervisor.will_serve_again()

    # ------------------------------------------------------------------------- requests

    def submit(self, input_ids: list[int], params: SamplingParams, namespace: str | None,
               queue: asyncio.Queue[Event], t_arrival: float,
               timeout_s: float | None = None) -> RequestState:
        """Queue one prompt. ``timeout_s`` is the request's own deadline; the server's
        ``--request-timeout`` stays an upper bound on it."""
        if not self.accepting:
            raise APIError(503, "The server is shutting down")
        if self.num_waiting >= self.cfg.max_queued_requests:
            raise APIError(503, f"Too many queued requests ({self.num_waiting} waiting, limit "
                           f"{self.cfg.max_queued_requests}); retry later")
        assert self.router is not None, "submit() before wait_ready()"
        rid = uuid.uuid4().hex
        # Stop strings are matched on text, in the router; the worker only sees token ids.
        wire_params = params if not (params.stop or params.stop_regex) else \
            dataclasses.replace(params, stop=(), stop_regex=())
        try:  # encode before counting anything: a value msgpack cannot hold takes no slot
            wire = m.encode(m.GenerateReq(rid, input_ids, wire_params, namespace))
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError) as e:
            raise APIError(400, f"Request cannot be sent to the engine: {e}") from None
        wid = self.router.choose(input_ids, namespace, [w.load for w in self.workers],
                                 [w.alive for w in self.workers])
        if wid is None and not self._can_recover():
            reasons = "; ".join(f"worker {w.wid}: {w.death}" for w in self.workers)
            raise APIError(503, f"No worker is available ({reasons})")
        limits = [t for t in (timeout_s, self.cfg.request_timeout_s) if t is not None]
        timeout = min(limits) if limits else None
        st = RequestState(rid, PENDING, input_ids, namespace, params.n, weakref.ref(queue),
                          t_arrival, wire, None if timeout is None else t_arrival + timeout,
                          timeout)
        self.requests[rid] = st
        self.num_waiting += 1
        if wid is None:
            self.pending[rid] = None
        else:
            self._dispatch_to(st, wid)
        return st

    def _dispatch_to(self, st: RequestState, wid: int) -> None:
        w = self.workers[wid]
        st.worker = wid
        w.load += 1
        self._send_raw(w, st.wire, "GenerateReq")

    def _send_pending(self) -> None:
        assert self.router is not None, "pending requests before wait_ready()"
        for rid in list(self.pending):
            st = self.requests.get(rid)
            wid = None if st is None else self.router.choose(
                st.input_ids, st.namespace, [w.load for w in self.workers],
                [w.alive for w in self.workers])
            if st is not None and wid is None:
                return  # nobody can take it yet
            del self.pending[rid]
            if st is not None and wid is not None:
                self._dispatch_to(st, wid)

    def abort(self, rid: str, index: int | None = None) -> None:
        """Stop generating ``rid`` (one sample, or all). Synchronous: safe while cancelled."""
        st = self.requests.get(rid)
        if st is None:
            return
        if st.worker != PENDING and self.workers[st.worker].alive:
            self._send(self.workers[st.worker], m.AbortReq(rid, index))
        if index is None:
            self.release(rid)

    def release(self, rid: str, output_ids: list[int] | None = None) -> None:
        """Forget a finished request; remember its tokens as cached on its worker."""
        st = self.requests.pop(rid, None)
        if st is None:
            return
        self.pending.pop(rid, None)
        if not st.started:
            self.num_waiting -= 1
        if st.worker == PENDING:
            return
        self.workers[st.worker].load -= 1
        if output_ids is not None and self.router is not None and self.workers[st.worker].alive:
            self.router.record(st.worker, st.input_ids + output_ids, st.namespace)

    async def flush_cache(self, timeout: float = 10.0) -> bool:
        seq = next(self._seq)
        live = [w for w in self.workers if w.alive]
        fut = self._flushes.begin(seq, len(live))
        for w in live:
            self._send(w, m.FlushCacheReq(seq))
        try:
            acks = await asyncio.wait_for(fut, timeout) if live else []
        except asyncio.TimeoutError:
            return False
        finally:
            self._flushes.end(seq)
        ok = bool(live) and all(acks)
        if ok and self.router is not None:
            self.router.clear()
        return ok

    # ------------------------------------------------------------------------- internals

    def _send(self, w: WorkerHandle, msg: m.ToWorker, quiet: bool = False) -> None:
        self._send_raw(w, m.encode(msg), type(msg).__name__, quiet)

    def _send_raw(self, w: WorkerHandle, data: bytes, what: str, quiet: bool = False) -> None:
        try:
            w.sock.send(data, zmq.NOBLOCK)
        except zmq.ZMQError as e:  # no peer connected: the worker is gone (the monitor acts)
            if not quiet and not w.send_warned:
                w.send_warned = True
                # str(e): a logged exception would keep its frames (and their queues) alive
                log.warning("could not send %s to worker %d: %s", what, w.wid, str(e))

    def _decode(self, data: bytes) -> m.ToRouter | None:
        try:
            return m.decode_to_router(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            log.error("dropping malformed message from a worker: %s", e)
            return None

    async def _recv_loop(self) -> None:
        while True:
            msg = self._decode(await self.pull.recv())
            if msg is not None:
                try:
                    self._dispatch(msg)
                except Exception:  # one bad message must not kill the loop
                    log.exception("error handling %s", type(msg).__name__)

    def _dispatch(self, msg: m.ToRouter) -> None:
        if isinstance(msg, m.TokenBatch):
            w = self.workers[msg.worker_id]
            if msg.stats is not None:
                w.stats = msg.stats
            w.last_pong = time.monotonic()  # a step result proves it is alive too
            for d in msg.deltas:
                st = self.requests.get(d.rid)
                if st is None:
                    continue  # aborted or failed already
                if not st.started:
                    st.started = True
                    self.num_waiting -= 1
                if not self._post(st, d):
                    self.abort(st.rid)
        elif isinstance(msg, m.PongMsg):
            w = self.workers[msg.worker_id]
            w.last_pong = time.monotonic()
            w.stats = msg.stats
        elif isinstance(msg, m.RequestError):
            st = self.requests.get(msg.rid)
            if st is not None and not self._post(st, RequestRejected(msg.message)):
                self.release(st.rid)
        elif isinstance(msg, m.FlushCacheResp):
            self._flushes.ack(msg.seq, msg.ok)
        elif isinstance(msg, m.WorkerFatal):
            if self.supervisor.is_current(msg.worker_id, msg.pid):
                # Fail its requests now; the Supervisor restarts it once the process exits.
                self._on_death(msg.worker_id, f"fatal error: {msg.message}")
        elif isinstance(msg, m.ReadyMsg):
            self._on_ready(msg)

    def _on_ready(self, msg: m.ReadyMsg) -> None:
        if self.workers[msg.worker_id].remote:  # RemoteHub checked its shape and identity
            self._mark_ready(self.workers[msg.worker_id], msg)
            return
        if not self.supervisor.mark_ready(msg.worker_id, msg.pid):
            log.warning("ignoring a stale Ready from worker %d (pid %d)", msg.worker_id, msg.pid)
            return
        w = self.workers[msg.worker_id]
        first = next((x.ready for x in self.workers if x.ready is not None), None)
        if first is not None and (first.vocab_size, first.max_context_len) != (
                msg.vocab_size, msg.max_context_len):
            log.error("worker %d came back with a different model shape; not using it", w.wid)
            self.supervisor.retire(w.wid, "restarted with a different model shape")
            self._on_death(w.wid, "restarted with a different model shape")
            return
        self._mark_ready(w, msg)

    def _mark_ready(self, w: WorkerHandle, msg: m.ReadyMsg) -> None:
        restarted = w.ready is not None
        w.ready, w.alive, w.death, w.send_warned = msg, True, None, False
        w.last_pong = time.monotonic()
        if restarted:
            log.info("worker %d is back (pid %d); %d waiting requests", w.wid, msg.pid,
                     len(self.pending))
            self._send_pending()

    async def _monitor_loop(self) -> None:
        while True:
            self.supervisor.poll([w.last_pong for w in self.workers], restart=self.accepting)
            for w in self.workers:
                if w.alive:
                    self._send(w, m.PingReq(next(self._seq)))
            if self.remote is not None:
                self.remote.check_deadlines(time.monotonic())
            self._expire(time.monotonic())
            await asyncio.sleep(self.cfg.ping_interval_s)

    def _post(self, st: RequestState, ev: Event) -> bool:
        """Hand ``ev`` to the request's consumer; False if the consumer is gone."""
        queue = st.queue_ref()
        if queue is None:
            return False
        queue.put_nowait(ev)
        return True

    def _expire(self, now: float) -> None:
        """Abort requests past their deadline, and those whose consumer is gone."""
        for st in list(self.requests.values()):
            if st.queue_ref() is None:
                log.warning("request %s has no consumer left; aborting it", st.rid)
                self.abort(st.rid)
            elif st.deadline is not None and now > st.deadline:
                own = st.timeout_s != self.cfg.request_timeout_s
                self._post(st, RequestTimeout(
                    f"request exceeded its deadline of {st.timeout_s:g}s "
                    f"({'its timeout' if own else '--request-timeout'}) and was aborted"))
                self.abort(st.rid)

    def _on_death(self, wid: int, why: str) -> None:
        """Worker ``wid`` is gone (the Supervisor may be replacing it): fail what it held."""
        w = self.workers[wid]
        w.alive, w.death = False, why
        again = not w.remote and self.supervisor.workers[wid].state in ("restarting", "starting")
        suffix = "; it is being restarted, retry the request" if again else ""
        if w.remote:
            log.error("remote worker %d is gone: %s", wid, why)
        for st in [s for s in self.requests.values() if s.worker == wid]:
            self._post(st, WorkerFailure(f"worker {wid} died ({why}){suffix}"))
            self.release(st.rid)
        if self.router is not None:
            self.router.forget_worker(wid)
        self._flushes.fail_all()  # don't wait for a dead worker's ack
        if self.pending:
            if self._can_recover():
                self._send_pending()  # another replica may take them
            else:
                for rid in list(self.pending):
                    waiting = self.requests.get(rid)
                    if waiting is not None:
                        self._post(waiting, WorkerFailure(f"no worker is available ({why})"))
                        self.release(rid)
