"""``radixrt node --node-rank K``: the follower ranks of a tensor-parallel replica on host K.

A replica with ``--tp T --nnodes N`` has T // N ranks per host, node-major: host K runs ranks
K*T/N .. (K+1)*T/N - 1 on its GPUs ``device`` .. ``device`` + T/N - 1. Node 0 is the server (or
remote worker) whose rank 0 owns the scheduler and binds torch.distributed's TCPStore at
``--dist-init-addr``; this process starts the ranks of its host against that address and waits.
The transport is torch.distributed's (TCPStore rendezvous, NCCL/gloo), nothing of ours; it is not
authenticated, so ``--dist-init-addr`` and the NCCL ports must be on a private network.

When the replica ends (rank 0's worker died and is being restarted, or rank 0 stopped), its
followers exit; this process then starts them again so they meet the next rank 0 (up to
``MAX_ROUNDS_PER_WINDOW`` times in ``WINDOW_S``, so a node started with the wrong flags does
not spin). SIGTERM / SIGINT stop the followers and exit.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from types import FrameType

import torch

from radixrt.config import EngineConfig
from radixrt.distributed.launch import rendezvous, spawn_follower

log = logging.getLogger("radixrt.node")

WINDOW_S = 600.0
MAX_ROUNDS_PER_WINDOW = 10
STOP_WAIT_S = 10.0


class _Stop(BaseException):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def node_ranks(config: EngineConfig, node_rank: int) -> range:
    assert 0 < node_rank < config.nnodes, \
        f"node_rank must be in [1, {config.nnodes - 1}] (node 0 runs rank 0), got {node_rank}"
    per_node = config.tp_size // config.nnodes
    return range(node_rank * per_node, (node_rank + 1) * per_node)


def run_node(config: EngineConfig, node_rank: int, rounds: int | None = None) -> int:
    """Serve this node's ranks until stopped (``rounds``: stop after that many replica
    lifetimes, for tests). Returns the last round's worst exit code."""
    ranks = node_ranks(config, node_rank)
    host, port = rendezvous(config)
    threads = torch.get_num_threads()
    if torch.device(config.device).type == "cpu":
        threads = max(1, threads // len(ranks))
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    started: list[float] = []
    procs: list[subprocess.Popen[bytes]] = []
    code = 0
    try:
        while rounds is None or len(started) < rounds:
            now = time.monotonic()
            started = [t for t in started if now - t < WINDOW_S] + [now]
            if len(started) > MAX_ROUNDS_PER_WINDOW:
                log.error("node %d: ranks ended %d times within %.0fs; giving up", node_rank,
                          MAX_ROUNDS_PER_WINDOW, WINDOW_S)
                return 1
            log.info("node %d: starting ranks %d..%d of %d against %s:%d", node_rank,
                     ranks[0], ranks[-1], config.tp_size, host, port)
            procs = [spawn_follower(config, r, config.tp_size, host, port, threads,
                                    r - ranks[0]) for r in ranks]
            codes = [p.wait() for p in procs]
            code = max(codes)
            log.info("node %d: replica ended (exit codes %s)", node_rank, codes)
        return code
    except _Stop:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
