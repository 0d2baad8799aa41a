"""Tensor parallelism across hosts, on one machine: two "nodes" on 127.0.0.1 (nnodes=2, tp=2:
one rank each, gloo), node 1 started as `radixrt node --node-rank 1`, give TP=1's greedy tokens
and logprobs within fp32 rounding; a node started with other engine flags is refused by rank 0's
config check instead of hanging the collectives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radixrt import Engine
from radixrt.config import EngineConfig
from radixrt.distributed.group import TPPeerLost, free_port
from tests.e2e.conftest import REPO
from tests.engine.test_tp import ATOL, GREEDY, _prompts

pytestmark = pytest.mark.slow


def start_node(model: str, addr: str, *extra: str, log: Path | None = None
               ) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "radixrt.cli", "node", "--node-rank", "1", "--nnodes", "2",
           "--tp", "2", "--dist-init-addr", addr, "--model", model, "--kv-cache-tokens", "4096",
           *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if log is None:
        return subprocess.Popen(cmd, cwd=REPO, env=env)
    with log.open("wb") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def stop_node(node: subprocess.Popen[bytes]) -> int:
    node.send_signal(signal.SIGTERM)
    return node.wait(60)


def test_two_nodes_on_loopback_match_tp1(tiny_model_dir) -> None:
    model = str(tiny_model_dir("llama"))
    prompts = _prompts(5)
    ref_engine = Engine(model, kv_cache_tokens=4096)
    try:
        ref = ref_engine.generate(prompts, GREEDY)
    finally:
        ref_engine.core.close()
    addr = f"127.0.0.1:{free_port()}"
    node = start_node(model, addr)
    try:
        engine = Engine(model, kv_cache_tokens=4096, tp_size=2, nnodes=2, dist_init_addr=addr)
        try:
            got = engine.generate(prompts, GREEDY)
            again = engine.generate(prompts, GREEDY)  # rank 0's cache, both nodes' KV
        finally:
            engine.core.close()
    finally:
        code = stop_node(node)
    assert code == 0, "the node exits cleanly on SIGTERM"
    for r, g, a in zip(ref, got, again, strict=True):
        assert g.token_ids == r.token_ids and a.token_ids == r.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(r.logprobs),
                                   atol=ATOL, rtol=0)
    assert all(o.cached_tokens >= 32 for o in again), "the second pass hits the cache"


def test_a_node_with_other_flags_is_refused(tiny_model_dir, tmp_path: Path) -> None:
    model = str(tiny_model_dir("llama"))
    addr = f"127.0.0.1:{free_port()}"
    log = tmp_path / "node.log"
    node = start_node(model, addr, "--max-running-requests", "7", log=log)
    try:
        with pytest.raises(TPPeerLost):
            Engine(model, kv_cache_tokens=4096, tp_size=2, nnodes=2, dist_init_addr=addr)
    finally:
        stop_node(node)
    text = log.read_text(errors="replace")
    assert "engine config differs from rank 0's" in text and "max_running_requests" in text


def test_multi_node_config_is_validated() -> None:
    with pytest.raises(ValueError, match="nnodes"):
        EngineConfig(tp_size=3, nnodes=2, dist_init_addr="127.0.0.1:1234")
    with pytest.raises(ValueError, match="dist_init_addr"):
        EngineConfig(tp_size=2, nnodes=2)
    EngineConfig(tp_size=4, nnodes=2, dist_init_addr="10.0.0.1:29500")
