"""WorkerLoop against a fake engine over inproc sockets: one request's exception fails that
request only, and the loop keeps answering."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from radixrt.sampling_params import SamplingParams
from radixrt.server import messages as m
from radixrt.server.worker import WorkerLoop, router_gone


class FakeCore:
    """Refuses seeds it cannot represent the way torch's RNG does (OverflowError)."""

    def __init__(self) -> None:
        self.added: list[str] = []

    def add_request(self, rid: str, input_ids: list[int], params: SamplingParams,
                    namespace: str | None = None) -> None:
        if params.seed is not None and params.seed >= 2**63:
            raise OverflowError("seed out of range")
        self.added.append(rid)

    def has_work(self) -> bool:
        return False


@pytest.fixture
def sockets() -> Iterator[tuple[zmq.Socket, zmq.Socket, zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    to_worker, worker_in = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    worker_out, from_worker = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    to_worker.bind("inproc://w")
    worker_in.connect("inproc://w")
    from_worker.bind("inproc://r")
    worker_out.connect("inproc://r")
    yield to_worker, worker_in, worker_out, from_worker
    for s in (to_worker, worker_in, worker_out, from_worker):
        s.close(0)
    ctx.term()


def test_an_exception_in_add_request_fails_only_that_request(sockets: Any) -> None:
    to_worker, worker_in, worker_out, from_worker = sockets
    core = FakeCore()
    loop = WorkerLoop(core, 0, worker_in, worker_out, os.getppid())  # type: ignore[arg-type]
    to_worker.send(m.encode(m.GenerateReq("bad", [1, 2], SamplingParams(seed=2**63 + 5))))
    to_worker.send(m.encode(m.GenerateReq("good", [1, 2], SamplingParams(seed=1))))
    loop._drain()
    err = m.decode_to_router(from_worker.recv())
    assert isinstance(err, m.RequestError) and err.rid == "bad"
    assert "OverflowError" in err.message
    assert core.added == ["good"], "the next request is served"


def test_router_gone_is_false_while_the_parent_lives() -> None:
    assert router_gone(os.getppid(), wait_s=0.0) is False
    assert router_gone(os.getppid() + 1, wait_s=0.0) is True
