"""Remote workers over ZeroMQ TCP (127.0.0.1) with CURVE keys: a replica started with
`radixrt worker --router tcp://...` serves requests through the router, a worker with a wrong
key is refused, and a killed remote worker fails its in-flight requests with 503 while the
local replica keeps serving. Timeouts here are hang guards, never assertions."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from radixrt.server import keys
from tests.e2e.conftest import REPO, Server, free_port
from tests.e2e.test_supervision import GUARD_S, LONG, health, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def key_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], dict[str, str]]:
    """The real keys, and a second set whose client key the router does not know."""
    good = keys.generate(str(tmp_path_factory.mktemp("keys") / "good"))
    wrong = keys.generate(str(tmp_path_factory.mktemp("keys") / "wrong"))
    return good, wrong


@pytest.fixture(scope="module")
def remote_addr() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def server(server_factory: Any, tiny_model_dir: Any, key_dirs: Any, remote_addr: str) -> Server:
    good, _ = key_dirs
    return server_factory(tiny_model_dir("llama"), "--worker-hang-timeout", "3",
                          "--remote-listen", remote_addr,
                          "--curve-server-secret", good["server_secret"],
                          "--curve-clients", good["clients_dir"])


class Workers:
    """Remote worker processes of this module; each is killed and reaped at the end."""

    def __init__(self, tmp: Path, model: Path, addr: str) -> None:
        self.tmp, self.model, self.addr = tmp, model, addr
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def start(self, client_secret: str, server_public: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "radixrt.cli", "worker", "--router", self.addr,
               "--curve-client-secret", client_secret, "--curve-server-public", server_public,
               "--model", str(self.model)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
        log = self.tmp / f"remote-{len(self.procs)}.log"
        with log.open("wb") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.procs.append(p)
        self.logs[p.pid] = log
        return p

    def log(self, p: subprocess.Popen[bytes]) -> str:
        return self.logs[p.pid].read_text(errors="replace")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Any,
            remote_addr: str) -> Iterator[Workers]:
    w = Workers(tmp_path_factory.mktemp("remote"), tiny_model_dir("llama"), remote_addr)
    yield w
    w.close()


def joined(s: Server, wid: int) -> int:
    return s.log().count(f"remote worker {wid} joined")


def first_event(stream: Any) -> Iterator[str]:
    it = stream.iter_lines()
    next(line for line in it if line.startswith("data: {"))
    return it


def rest(it: Iterator[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in it if line.startswith("data: {")]


def test_keys_are_private_files(key_dirs: Any) -> None:
    good, _ = key_dirs
    for path in (good["server_secret"], good["client_secret"], good["server_public"]):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert keys.load_pair(good["server_secret"]).public == keys.load_public(good["server_public"])
    with pytest.raises(FileExistsError):
        keys.generate(str(Path(good["server_secret"]).parent))


def test_remote_worker_serves_requests(server: Server, workers: Workers, key_dirs: Any) -> None:
    good, _ = key_dirs
    workers.start(good["client_secret"], good["server_public"])
    wait_for("the remote worker to join", lambda: joined(server, 1) == 1)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                           timeout=GUARD_S)
    model = server_model(server)
    shared = "The quick brown fox jumps over the lazy dog while the cat watches. " * 3

    def ask(prompt: str) -> Any:
        return client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                         temperature=0, extra_body={"ignore_eos": True})

    # While the local worker is busy with an unrelated stream, a prompt no worker has seen
    # goes to the least-loaded worker: the remote one.
    body = {"prompt": "Hello", "temperature": 0, "ignore_eos": True, "stream": True,
            "max_tokens": LONG["max_tokens"]}
    with httpx.stream("POST", server.url + "/v1/completions", timeout=GUARD_S,
                      json=body) as busy:
        assert busy.status_code == 200
        it = first_event(busy)
        remote = ask(shared)
        assert all("error" not in e for e in rest(it))
    assert remote.usage is not None and remote.usage.completion_tokens == 12
    # Cache-aware routing treats the remote replica like a local one: the same prompt on an
    # idle server goes back to it, and hits its prefix cache (the local worker never saw it).
    again = ask(shared)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert (again.usage.prompt_tokens_details.cached_tokens or 0) > 0
    assert again.choices[0].text == remote.choices[0].text
    m = server.metrics()
    assert m['radixrt_worker_up{worker="1"}'] == 1.0
    assert m.get('radixrt_kv_pages{worker="1",state="evictable"}', 0) > 0
    # /flush_cache waits for both replicas' acks, the remote one's included.
    r = httpx.post(server.url + "/flush_cache", timeout=GUARD_S)
    assert r.status_code == 200 and r.json() == {"flushed": True}, r.text
    cold = ask(shared)
    assert cold.usage is not None and cold.usage.prompt_tokens_details is not None
    assert not cold.usage.prompt_tokens_details.cached_tokens


def server_model(s: Server) -> str:
    return str(httpx.get(s.url + "/v1/models", timeout=10).json()["data"][0]["id"])


def test_worker_with_a_wrong_key_is_refused(server: Server, workers: Workers,
                                            key_dirs: Any) -> None:
    good, wrong = key_dirs
    before = server.log().count("refused a remote worker")
    intruder = workers.start(wrong["client_secret"], good["server_public"])
    wait_for("the router to refuse the wrong key",
             lambda: server.log().count("refused a remote worker") > before)
    assert intruder.wait(GUARD_S) == 2, "the refused worker exits before loading the model"
    assert "refused this worker's CURVE key" in workers.log(intruder)
    assert "remote worker 2 joined" not in server.log()
    assert health(server)[0] == 200
    metrics = server.metrics()
    assert 'radixrt_worker_up{worker="2"}' not in metrics, "no slot for a refused peer"


def test_killed_remote_worker_fails_its_requests_and_may_rejoin(
        server: Server, workers: Workers, key_dirs: Any) -> None:
    good, _ = key_dirs
    remote = workers.procs[0]
    assert remote.poll() is None and joined(server, 1) == 1
    body = {"prompt": "Hello", "temperature": 0, "stream": True, **LONG}
    url = server.url + "/v1/completions"
    with httpx.stream("POST", url, json=body, timeout=GUARD_S) as local, \
            httpx.stream("POST", url, json=body, timeout=GUARD_S) as doomed:
        it_local, it_doomed = first_event(local), first_event(doomed)
        remote.send_signal(signal.SIGKILL)
        doomed_events = rest(it_doomed)
        local_events = rest(it_local)
    err = doomed_events[-1].get("error")
    assert err is not None and err["code"] == 503, doomed_events[-1:]
    assert "remote worker stopped answering" in err["message"], err
    assert all("error" not in e for e in local_events), "the local replica kept serving"
    assert local_events[-1]["choices"][0]["finish_reason"] == "length"
    code, _ = health(server)
    assert code == 200, "one replica left: still healthy"
    assert server.metrics()['radixrt_worker_up{worker="1"}'] == 0.0
    # A fresh worker takes the dead slot back.
    workers.start(good["client_secret"], good["server_public"])
    wait_for("a new remote worker to join slot 1", lambda: joined(server, 1) == 2)
    r = httpx.post(url, json={"prompt": "again", "max_tokens": 3}, timeout=GUARD_S)
    assert r.status_code == 200, r.text
