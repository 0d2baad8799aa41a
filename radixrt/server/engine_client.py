"""The router's side of the IPC: worker handles, request bookkeeping, routing, health.

All of it runs on the router's asyncio loop. Sends use plain (synchronous) ZeroMQ sockets with
NOBLOCK and no high-water mark, so they never wait and can run anywhere, including in the
``finally`` of a cancelled stream (that is how a client disconnect becomes an abort). One
receive task decodes worker messages and fans each step's deltas out to per-request queues.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio

from radixrt.sampling_params import SamplingParams
from radixrt.server import messages as m
from radixrt.server.config import ServerConfig
from radixrt.server.protocol import APIError
from radixrt.server.routing import PrefixRouter
from radixrt.server.worker import to_router_addr, to_worker_addr

log = logging.getLogger("radixrt.router")


class WorkerFailure(Exception):
    """The worker serving a request died or failed; the request cannot complete."""


class RequestRejected(Exception):
    """The engine refused the request (its ValueError message)."""


Event = m.DeltaMsg | WorkerFailure | RequestRejected


@dataclass(eq=False)
class RequestState:
    rid: str
    worker: int
    input_ids: list[int]
    namespace: str | None
    n: int
    queue: asyncio.Queue[Event]
    t_arrival: float
    started: bool = False  # first delta seen (no longer counts as queued)


@dataclass(eq=False)
class WorkerHandle:
    wid: int
    proc: subprocess.Popen[bytes] | None
    sock: zmq.Socket
    ready: m.ReadyMsg | None = None
    alive: bool = True
    last_pong: float = 0.0
    stats: m.StatsMsg | None = None
    load: int = 0  # requests routed here and not finished
    death: str | None = None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class EngineClient:
    def __init__(self, cfg: ServerConfig, ipc_dir: str) -> None:
        self.cfg = cfg
        self._sync_ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        self.pull = self._actx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 0)
        self.pull.bind(to_router_addr(ipc_dir))
        self.workers: list[WorkerHandle] = []
        for i in range(cfg.dp):
            s = self._sync_ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(to_worker_addr(ipc_dir, i))
            self.workers.append(WorkerHandle(i, None, s))
        self.requests: dict[str, RequestState] = {}
        self.num_waiting = 0  # submitted, no token yet: what --max-queued-requests bounds
        self.accepting = True
        self.router: PrefixRouter | None = None
        self._seq = itertools.count(1)
        self._flush_waiters: dict[int, asyncio.Future[list[bool]]] = {}
        self._flush_acks: dict[int, list[bool]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------------- lifecycle

    def attach(self, procs: list[subprocess.Popen[bytes]]) -> None:
        assert len(procs) == len(self.workers), "one process per worker"
        for w, p in zip(self.workers, procs):
            w.proc = p

    async def wait_ready(self, timeout: float) -> list[m.ReadyMsg]:
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self.workers):
            for w in self.workers:
                code = w.proc.poll() if w.proc else None
                if code is not None:
                    raise RuntimeError(f"worker {w.wid} {describe_exit(code)} during startup")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"workers not ready after {timeout:.0f}s")
            if await self.pull.poll(int(min(left, 0.2) * 1000)):
                msg = self._decode(await self.pull.recv())
                if isinstance(msg, m.WorkerFatal):
                    raise RuntimeError(f"worker {msg.worker_id} failed to start: {msg.message}")
                if isinstance(msg, m.ReadyMsg):
                    self.workers[msg.worker_id].ready = msg
                    self.workers[msg.worker_id].last_pong = time.monotonic()
        infos = [w.ready for w in self.workers if w.ready]
        per_worker_tokens = max(4096, (infos[0].max_context_len * 8))
        self.router = PrefixRouter(len(self.workers), per_worker_tokens)
        return infos

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._recv_loop(), name="radixrt-recv"),
                       asyncio.create_task(self._monitor_loop(), name="radixrt-monitor")]

    def begin_shutdown(self, grace_s: float) -> None:
        """Stop accepting now; end what is still running after ``grace_s`` with an error."""
        self.accepting = False
        asyncio.get_running_loop().call_later(grace_s, self.fail_all, "server is shutting down")

    def fail_all(self, why: str) -> None:
        for st in list(self.requests.values()):
            st.queue.put_nowait(WorkerFailure(why))
            self.abort(st.rid)

    async def shutdown(self, grace_s: float) -> None:
        """Abort what is left, ask workers to exit, then make sure they did."""
        self.accepting = False
        self.fail_all("server is shutting down")
        for w in self.workers:
            self._send(w, m.ShutdownReq("router shutdown"))
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            while w.proc and w.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        for t in self._tasks:
            t.cancel()
        self.close()

    def close(self) -> None:
        for w in self.workers:
            w.sock.close(0)
        self.pull.close(0)
        self._sync_ctx.term()
        self._actx.term()

    # ------------------------------------------------------------------------- health

    def healthy(self) -> tuple[bool, str]:
        now = time.monotonic()
        for w in self.workers:
            if not w.alive:
                return False, f"worker {w.wid} is dead: {w.death}"
            if now - w.last_pong > self.cfg.health_timeout_s:
                return False, f"worker {w.wid} has not answered for {now - w.last_pong:.1f}s"
        if not self.accepting:
            return False, "server is shutting down"
        return True, "ok"

    # ------------------------------------------------------------------------- requests

    def submit(self, input_ids: list[int], params: SamplingParams, namespace: str | None,
               queue: asyncio.Queue[Event], t_arrival: float) -> RequestState:
        if not self.accepting:
            raise APIError(503, "The server is shutting down")
        if self.num_waiting >= self.cfg.max_queued_requests:
            raise APIError(503, f"Too many queued requests ({self.num_waiting} waiting, limit "
                           f"{self.cfg.max_queued_requests}); retry later")
        assert self.router is not None, "submit() before wait_ready()"
        wid = self.router.choose(input_ids, namespace, [w.load for w in self.workers],
                                 [w.alive for w in self.workers])
        if wid is None:
            reasons = "; ".join(f"worker {w.wid}: {w.death}" for w in self.workers)
            raise APIError(503, f"No worker is available ({reasons})")
        w = self.workers[wid]
        rid = uuid.uuid4().hex
        st = RequestState(rid, wid, input_ids, namespace, params.n, queue, t_arrival)
        self.requests[rid] = st
        w.load += 1
        self.num_waiting += 1
        # Stop strings are matched on text, in the router; the worker only sees token ids.
        wire_params = params if not params.stop else _without_stop(params)
        self._send(w, m.GenerateReq(rid, input_ids, wire_params, namespace))
        return st

    def abort(self, rid: str, index: int | None = None) -> None:
        """Stop generating ``rid`` (one sample, or all). Synchronous: safe while cancelled."""
        st = self.requests.get(rid)
        if st is None:
            return
        w = self.workers[st.worker]
        if w.alive:
            self._send(w, m.AbortReq(rid, index))
        if index is None:
            self.release(rid)

    def release(self, rid: str, output_ids: list[int] | None = None) -> None:
        """Forget a finished request; remember its tokens as cached on its worker."""
        st = self.requests.pop(rid, None)
        if st is None:
            return
        self.workers[st.worker].load -= 1
        if not st.started:
            self.num_waiting -= 1
        if output_ids is not None and self.router is not None and self.workers[st.worker].alive:
            self.router.record(st.worker, st.input_ids + output_ids, st.namespace)

    async def flush_cache(self, timeout: float = 10.0) -> bool:
        seq = next(self._seq)
        fut: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self._flush_waiters[seq] = fut
        self._flush_acks[seq] = []
        live = [w for w in self.workers if w.alive]
        for w in live:
            self._send(w, m.FlushCacheReq(seq))
        try:
            acks = await asyncio.wait_for(fut, timeout) if live else []
        except asyncio.TimeoutError:
            return False
        finally:
            self._flush_waiters.pop(seq, None)
            self._flush_acks.pop(seq, None)
        ok = bool(live) and all(acks)
        if ok and self.router is not None:
            self.router.clear()
        return ok

    # ------------------------------------------------------------------------- internals

    def _send(self, w: WorkerHandle, msg: m.ToWorker) -> None:
        try:
            w.sock.send(m.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as e:  # no peer connected: the worker is gone
            log.warning("could not send %s to worker %d: %s", type(msg).__name__, w.wid, e)

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
                st.queue.put_nowait(d)
        elif isinstance(msg, m.PongMsg):
            w = self.workers[msg.worker_id]
            w.last_pong = time.monotonic()
            w.stats = msg.stats
        elif isinstance(msg, m.RequestError):
            st = self.requests.get(msg.rid)
            if st is not None:
                st.queue.put_nowait(RequestRejected(msg.message))
        elif isinstance(msg, m.FlushCacheResp):
            acks = self._flush_acks.get(msg.seq)
            fut = self._flush_waiters.get(msg.seq)
            if acks is not None and fut is not None and not fut.done():
                acks.append(msg.ok)
                if len(acks) == sum(w.alive for w in self.workers):
                    fut.set_result(acks)
        elif isinstance(msg, m.WorkerFatal):
            self._on_death(self.workers[msg.worker_id], f"fatal error: {msg.message}")
        elif isinstance(msg, m.ReadyMsg):
            log.warning("unexpected Ready from worker %d after startup", msg.worker_id)

    async def _monitor_loop(self) -> None:
        while True:
            for w in self.workers:
                code = w.proc.poll() if w.proc is not None else None
                if code is not None and w.alive:
                    self._on_death(w, f"process {w.proc.pid if w.proc else '?'} "
                                      f"{describe_exit(code)}")
                elif w.alive:
                    self._send(w, m.PingReq(next(self._seq)))
            await asyncio.sleep(self.cfg.ping_interval_s)

    def _on_death(self, w: WorkerHandle, why: str) -> None:
        if not w.alive:
            return
        w.alive = False
        w.death = why
        log.error("worker %d died (%s); failing its in-flight requests", w.wid, why)
        for st in [s for s in self.requests.values() if s.worker == w.wid]:
            st.queue.put_nowait(WorkerFailure(f"worker {w.wid} died ({why})"))
            self.release(st.rid)
        if self.router is not None:
            self.router.forget_worker(w.wid)
        for fut in self._flush_waiters.values():  # don't wait for a dead worker's ack
            if not fut.done():
                fut.set_result([False])


def _without_stop(params: SamplingParams) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, stop=())
