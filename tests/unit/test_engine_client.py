"""EngineClient bookkeeping without processes: queue slots on every error path, requests that
wait for a restarting worker, deadlines, and failing what a dead worker held."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from radixrt.sampling_params import SamplingParams
from radixrt.server import engine_client as ec
from radixrt.server import messages as m
from radixrt.server.config import ServerConfig
from radixrt.server.protocol import APIError
from radixrt.server.routing import PrefixRouter
from radixrt.server.worker import to_worker_addr


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None


def ready_msg(pid: int) -> m.ReadyMsg:
    return m.ReadyMsg(worker_id=0, pid=pid, model_name="tiny", model_path=None, vocab_size=100,
                      max_context_len=512, eos_token_ids=[0], page_size=16)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[ec.EngineClient]:
    cfg = ServerConfig(max_queued_requests=3, request_timeout_s=5.0)
    c = ec.EngineClient(cfg, str(tmp_path))
    c.supervisor.workers[0].proc = FakeProc(1234)  # type: ignore[assignment]
    c._on_ready(ready_msg(1234))
    c.router = PrefixRouter(1, 4096)
    yield c
    c.close()


_consumers: list[asyncio.Queue[Any]] = []  # the client holds queues weakly: keep them alive


def submit(c: ec.EngineClient, q: asyncio.Queue[Any] | None = None,
           t: float = 0.0) -> ec.RequestState:
    q = q if q is not None else asyncio.Queue()
    _consumers.append(q)
    return c.submit([1, 2, 3], SamplingParams(max_new_tokens=4), None, q, t)


def test_config_file_is_private(client: ec.EngineClient) -> None:
    path = Path(client.supervisor.config_path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert ServerConfig.from_json(path.read_bytes()) == client.cfg


def test_unencodable_request_takes_no_slot(client: ec.EngineClient,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def overflow(msg: Any) -> bytes:
        raise OverflowError("int too big to convert")

    monkeypatch.setattr(ec.m, "encode", overflow)
    for _ in range(10):  # more than max_queued_requests: a leaked slot would turn into 503s
        with pytest.raises(APIError) as e:
            submit(client)
        assert e.value.status == 400
    assert client.num_waiting == 0 and not client.requests
    assert client.workers[0].load == 0
    monkeypatch.undo()
    st = submit(client)
    assert client.num_waiting == 1 and st.worker == 0


def test_request_waits_for_a_restarting_worker(client: ec.EngineClient, tmp_path: Path) -> None:
    peer = client._sync_ctx.socket(zmq.PULL)
    peer.connect(to_worker_addr(str(tmp_path), 0))
    connected = False
    for _ in range(500):  # the ipc connection comes up asynchronously
        try:
            client.workers[0].sock.send(b"probe", zmq.NOBLOCK)
            connected = True
            break
        except zmq.Again:
            time.sleep(0.01)
    assert connected and peer.recv() == b"probe"
    try:
        w = client.supervisor.workers[0]
        w.state = "restarting"
        client._on_death(0, "process 1234 killed by signal SIGKILL")
        st = submit(client)
        assert st.worker == ec.PENDING and st.rid in client.pending
        assert client.healthy()[0] is False
        w.proc, w.state = FakeProc(5678), "starting"  # type: ignore[assignment]
        client._on_ready(ready_msg(1234))  # a stale Ready from the old incarnation: ignored
        assert st.worker == ec.PENDING
        client._on_ready(ready_msg(5678))
        assert st.worker == 0 and not client.pending and client.healthy()[0]
        assert peer.poll(5000), "the waiting request is sent to the new worker"
        got = m.decode_to_worker(peer.recv())
        assert isinstance(got, m.GenerateReq) and got.rid == st.rid
    finally:
        peer.close(0)


def test_pending_requests_fail_when_no_worker_will_come_back(client: ec.EngineClient) -> None:
    w = client.supervisor.workers[0]
    w.state = "restarting"
    client._on_death(0, "crashed")
    q: asyncio.Queue[Any] = asyncio.Queue()
    submit(client, q)
    w.state = "dead"
    client._on_death(0, "crashed; restart limit reached")
    ev = q.get_nowait()
    assert isinstance(ev, ec.WorkerFailure) and "no worker" in str(ev)
    assert client.num_waiting == 0 and not client.requests and not client.pending
    with pytest.raises(APIError) as e:
        submit(client)
    assert e.value.status == 503


def test_death_fails_in_flight_requests_and_frees_their_slots(client: ec.EngineClient) -> None:
    q: asyncio.Queue[Any] = asyncio.Queue()
    submit(client, q)
    client.supervisor.workers[0].state = "restarting"
    client._on_death(0, "process 1234 killed by signal SIGKILL")
    ev = q.get_nowait()
    assert isinstance(ev, ec.WorkerFailure)
    assert "SIGKILL" in str(ev) and "restarted" in str(ev)
    assert client.num_waiting == 0 and client.workers[0].load == 0 and not client.requests


def test_deadline_aborts_the_request(client: ec.EngineClient) -> None:
    q: asyncio.Queue[Any] = asyncio.Queue()
    st = submit(client, q, t=100.0)
    assert st.deadline == 105.0
    client._expire(104.0)
    assert q.empty()
    client._expire(106.0)
    ev = q.get_nowait()
    assert isinstance(ev, ec.RequestTimeout) and "deadline" in str(ev)
    assert client.num_waiting == 0 and not client.requests


def test_a_request_timeout_is_bounded_by_the_server_default(client: ec.EngineClient) -> None:
    params = SamplingParams(max_new_tokens=4)
    short_q: asyncio.Queue[Any] = asyncio.Queue()
    long_q: asyncio.Queue[Any] = asyncio.Queue()
    _consumers.extend([short_q, long_q])
    short = client.submit([1, 2, 3], params, None, short_q, 100.0, timeout_s=1.0)
    long = client.submit([1, 2, 3], params, None, long_q, 100.0, timeout_s=60.0)
    assert short.deadline == 101.0, "the request's own timeout applies"
    assert long.deadline == 105.0, "--request-timeout (5 s here) caps a longer one"
    client._expire(102.0)
    ev = short_q.get_nowait()
    assert isinstance(ev, ec.RequestTimeout) and "its timeout" in str(ev)
    assert long_q.empty() and long.rid in client.requests


def test_request_whose_consumer_is_gone_is_aborted(client: ec.EngineClient) -> None:
    """A streaming response that never started (its client left first) drops its consumer
    without closing it: the request must not hold its slot and keep generating for nobody."""
    q: asyncio.Queue[Any] = asyncio.Queue()
    st = client.submit([1, 2, 3], SamplingParams(max_new_tokens=4), None, q, 0.0)
    del q
    assert st.queue_ref() is None
    client._expire(1.0)
    assert client.num_waiting == 0 and not client.requests and client.workers[0].load == 0


def test_with_dp_a_dead_replica_sends_new_requests_to_the_other(tmp_path: Path) -> None:
    c = ec.EngineClient(ServerConfig(dp=2), str(tmp_path))
    try:
        for wid, pid in ((0, 11), (1, 22)):
            c.supervisor.workers[wid].proc = FakeProc(pid)  # type: ignore[assignment]
            c._on_ready(msgspec.structs.replace(ready_msg(pid), worker_id=wid))
        c.router = PrefixRouter(2, 4096)
        c.supervisor.workers[0].state = "restarting"
        c._on_death(0, "killed")
        sts = [submit(c) for _ in range(4)]
        assert all(st.worker == 1 for st in sts) and not c.pending
        assert c.healthy()[0], "one replica serving is healthy"
    finally:
        c.close()


# ------------------------------------------------------------------------- remote workers


def test_remote_worker_joins_dies_by_heartbeat_and_rejoins(tmp_path: Path) -> None:
    """RemoteHub over real CURVE TCP on 127.0.0.1, messages pumped by hand (no event loop)."""
    from radixrt.server import keys
    from radixrt.server.remote_worker import handshake

    good = keys.generate(str(tmp_path / "good"))
    wrong = keys.generate(str(tmp_path / "wrong"))
    cfg = ServerConfig(remote_listen="tcp://127.0.0.1:*", curve_server_secret=good["server_secret"],
                       curve_clients=good["clients_dir"], worker_hang_timeout_s=5.0)
    c = ec.EngineClient(cfg, str(tmp_path))
    ctx = zmq.Context()
    socks = []

    def dealer(which: dict[str, str]) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        keys.curve_client(s, keys.load_pair(which["client_secret"]),
                          keys.load_public(good["server_public"]))
        s.connect(c.remote.endpoint)  # type: ignore[union-attr]
        socks.append(s)
        return s

    def pump() -> None:
        assert c.remote is not None
        assert c.remote.sock.poll(10_000), "a message from the remote worker"
        ident, data = c.remote.sock.recv_multipart()
        msg = c._decode(data)
        assert msg is not None
        c.remote._handle(ident, msg)

    try:
        c.supervisor.workers[0].proc = FakeProc(1234)  # type: ignore[assignment]
        c._on_ready(ready_msg(1234))
        c.router = PrefixRouter(1, 4096)
        assert c.remote is not None
        intruder = dealer(wrong)
        assert handshake(intruder, 10.0) is False, "a key off the allow-list is refused"
        assert c.remote.refused >= 1 and len(c.workers) == 1
        w = dealer(good)
        w.send(m.encode(ready_msg(99)))
        pump()
        assert len(c.workers) == 2 and c.workers[1].remote and c.workers[1].alive
        assert len(c.router.trees) == 2, "routing knows the new replica"
        c.workers[0].load = 5  # the local worker is busy: the next request goes remote
        q: asyncio.Queue[Any] = asyncio.Queue()
        st = submit(c, q)
        assert st.worker == 1
        assert w.poll(10_000) and isinstance(m.decode_to_worker(w.recv()), m.GenerateReq)
        w.send(m.encode(m.PongMsg(0, 1, m.stats_to_msg(stats()))))  # worker_id rewritten to 1
        pump()
        assert c.workers[1].stats is not None
        c.workers[1].last_pong = time.monotonic() - 6.0
        c.remote.check_deadlines(time.monotonic())
        assert not c.workers[1].alive
        ev = q.get_nowait()
        assert isinstance(ev, ec.WorkerFailure) and "stopped answering" in str(ev)
        assert st.rid not in c.requests and c.num_waiting == 0
        ok, why = c.healthy()
        assert ok, "the local worker still serves"
        w.send(m.encode(ready_msg(99)))  # it hears nothing, says Ready again: same slot
        pump()
        assert len(c.workers) == 2 and c.workers[1].alive
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        c.close()


def stats() -> Any:
    from radixrt.engine.outputs import EngineStats

    return EngineStats(0, 0, 10, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def test_a_busy_remote_port_fails_with_one_line(tmp_path: Path) -> None:
    import socket

    from radixrt.server import keys

    good = keys.generate(str(tmp_path / "k"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = ServerConfig(remote_listen=f"tcp://127.0.0.1:{port}",
                           curve_server_secret=good["server_secret"],
                           curve_clients=good["clients_dir"])
        with pytest.raises(RuntimeError, match="cannot listen on .* for remote workers"):
            ec.EngineClient(cfg, str(tmp_path))
