"""What the router keeps per worker and per request (EngineClient owns both tables), and the
failures a request's consumer can receive."""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass
from typing import Protocol

from radixrt.server import messages as m

PENDING = -1  # RequestState.worker of a request waiting for a worker to be ready


class WorkerFailure(Exception):
    """The worker serving a request died or failed; the request cannot complete (503)."""


class RequestTimeout(WorkerFailure):
    """The request ran past its deadline (its ``timeout`` or ``--request-timeout``) and was
    aborted (504)."""


class RequestRejected(Exception):
    """The engine refused the request (its ValueError message)."""


Event = m.DeltaMsg | WorkerFailure | RequestRejected


@dataclass(eq=False)
class RequestState:
    rid: str
    worker: int  # PENDING until sent
    input_ids: list[int]
    namespace: str | None
    n: int
    # Weak: if the consumer is dropped without closing (a streaming response that never
    # started, e.g. its client left first), the request is found orphaned and aborted.
    queue_ref: weakref.ref[asyncio.Queue[Event]]
    t_arrival: float
    wire: bytes  # the encoded GenerateReq
    deadline: float | None = None  # monotonic
    timeout_s: float | None = None  # what set the deadline, for the error message
    started: bool = False  # first delta seen (no longer counts as queued)


class Sender(Protocol):
    """A local worker's PUSH socket, or a remote worker's identity on the hub's ROUTER socket
    (radixrt.server.remote.RemoteSender)."""

    def send(self, data: bytes, flags: int = ...) -> object: ...

    def close(self, linger: int | None = ...) -> None: ...


@dataclass(eq=False)
class WorkerHandle:
    wid: int
    sock: Sender
    remote: bool = False  # joined over TCP (RemoteHub): supervised by heartbeat, never restarted
    ready: m.ReadyMsg | None = None
    alive: bool = False  # ready and taking requests
    last_pong: float = 0.0  # last message of any kind from it (monotonic)
    stats: m.StatsMsg | None = None
    load: int = 0  # requests routed here and not finished
    death: str | None = None
    send_warned: bool = False  # one "could not send" warning per incarnation, not one per ping


class FlushAcks:
    """The /flush_cache calls in flight: each waits for one ack per worker alive when it began
    (a worker dying meanwhile fails it: its cache state is unknown)."""

    def __init__(self) -> None:
        self._waiting: dict[int, tuple[asyncio.Future[list[bool]], int, list[bool]]] = {}

    def begin(self, seq: int, expected: int) -> asyncio.Future[list[bool]]:
        fut: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = (fut, expected, [])
        return fut

    def ack(self, seq: int, ok: bool) -> None:
        entry = self._waiting.get(seq)
        if entry is None or entry[0].done():
            return  # timed out already, or failed by a death
        fut, expected, acks = entry
        acks.append(ok)
        if len(acks) == expected:
            fut.set_result(acks)

    def fail_all(self) -> None:
        for fut, _, _ in self._waiting.values():
            if not fut.done():
                fut.set_result([False])

    def end(self, seq: int) -> None:
        self._waiting.pop(seq, None)
