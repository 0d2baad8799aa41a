"""Building a model runner on one rank, and starting the follower ranks of a TP replica.

    worker process (rank 0)                    follower processes (ranks 1..N-1)
      EngineCore                                 python -m radixrt.distributed.follower
        start_followers ──spawn, config on stdin──▶ TPGroup.connect
        TPGroup.connect   ◀──── TCPStore rendezvous ────▶
        build_runner(shard 0)                     build_runner(shard r)   (same code, same order:
        scheduler, radix cache                    follow(): plan -> forward  collectives pair up)

Across hosts (``nnodes`` > 1): ranks are laid out node-major, tp_size // nnodes per node; rank 0
binds the TCPStore at ``dist_init_addr`` and starts only its own node's followers; every other
node runs ``radixrt node --node-rank K`` (radixrt.distributed.node), which starts that node's
ranks against the same address. Every follower checks that its engine config is rank 0's
(``check_same_config``) before it loads anything.

Rank 0 owns the scheduler and the cache; the followers own nothing but their shard and obey
plans. Lifetime: a follower exits when rank 0 tells it to, when its connection to rank 0 closes,
or (Linux) when rank 0's process dies (PR_SET_PDEATHSIG); rank 0 checks its followers are alive
before every step and fails with TPPeerLost (a device fault: the worker is replaced) if one is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from radixrt.cache.device_pages import DevicePageTable
from radixrt.cache.kv_pool import KVPool
from radixrt.distributed.group import TPGroup, TPPeerLost, free_port
from radixrt.distributed.plan import PlanSender, RecordingPageTable
from radixrt.engine.runner import ModelRunner, cascade_policy, make_attention_backend
from radixrt.models.layers import set_gemm
from radixrt.models.loader import LoadedModel, load_model

if TYPE_CHECKING:
    from radixrt.config import EngineConfig

logger = logging.getLogger(__name__)

STOP_WAIT_S = 10.0  # a follower told to stop that has not exited by then is killed


@dataclass
class BuiltRunner:
    loaded: LoadedModel
    pool: KVPool
    runner: ModelRunner
    num_pages: int
    max_context: int


CONFIG_KEY = "radixrt/engine_config"


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """A replica's local rank r on CUDA uses the r-th GPU after the node's base device."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + local_rank)


def rendezvous(config: EngineConfig) -> tuple[str, int]:
    """Where rank 0's TCPStore is: ``dist_init_addr`` across hosts, else a free local port."""
    if config.nnodes == 1:
        return "127.0.0.1", free_port()
    assert config.dist_init_addr is not None, "EngineConfig validates nnodes > 1 has an address"
    host, _, port = config.dist_init_addr.rpartition(":")
    return host.strip("[]"), int(port)


def config_fingerprint(config: EngineConfig) -> str:
    """What must be equal on every rank for their shards to pair up: all but the device and the
    model's path (another host may mount the same checkpoint elsewhere)."""
    fields = dataclasses.asdict(config)
    fields.pop("device")
    fields.pop("model")
    return json.dumps(fields, sort_keys=True, default=str)


def check_same_config(tp: TPGroup, config: EngineConfig) -> None:
    """Rank 0 publishes its config; a follower refuses to run with a different one (another
    node started with other flags would otherwise hang or corrupt the collectives)."""
    assert tp.store is not None, "a connected group has a store"
    mine = config_fingerprint(config)
    if tp.rank == 0:
        tp.store.set(CONFIG_KEY, mine)
        return
    theirs = tp.store.get(CONFIG_KEY).decode()
    if theirs != mine:
        a, b = json.loads(theirs), json.loads(mine)
        diff = {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        raise ValueError(f"rank {tp.rank}: engine config differs from rank 0's "
                         f"(field: (rank 0, this rank)): {diff}")


def spawn_follower(config: EngineConfig, rank: int, size: int, host: str, port: int,
                   threads: int, local_rank: int) -> subprocess.Popen[bytes]:
    """Start rank ``rank`` (the node's ``local_rank``-th) as ``python -m
    radixrt.distributed.follower``, its spec on stdin (never argv)."""
    cfg = dataclasses.replace(config, device=str(rank_device(torch.device(config.device),
                                                             local_rank)))
    spec = {"config": dataclasses.asdict(cfg), "rank": rank, "size": size, "host": host,
            "port": port, "threads": threads}
    proc = subprocess.Popen([sys.executable, "-m", "radixrt.distributed.follower"],
                            stdin=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    return proc


def build_runner(config: EngineConfig, device: torch.device, tp: TPGroup | None) -> BuiltRunner:
    """Model (this rank's shard) + KV pool + attention backend + runner. Every rank runs exactly
    this, in this order: the pool size and CUDA-graph capture involve collectives."""
    from radixrt.engine.core import kv_pool_pages  # core imports this module

    loaded = load_model(config.model, dtype=config.torch_dtype, device=device,
                        load_format=config.load_format, seed=config.seed, tp=tp)
    args, plan = loaded.args, loaded.model.shard_plan
    local = dataclasses.replace(args, num_heads=plan.num_heads, num_kv_heads=plan.num_kv_heads)
    num_pages = kv_pool_pages(config, local, device)
    if tp is not None:
        num_pages = tp.min_int(num_pages)  # every rank's pool holds the same pages
    pool = KVPool(num_layers=args.num_layers, num_pages=num_pages, page_size=config.page_size,
                  num_kv_heads=plan.num_kv_heads, head_dim=args.head_dim,
                  dtype=config.torch_dtype, device=device)
    max_context = config.max_context_len or args.max_position_embeddings
    backend = make_attention_backend(
        config.attention_backend, device, num_heads=plan.num_heads,
        num_kv_heads=plan.num_kv_heads, head_dim=args.head_dim,
        max_batch=config.max_running_requests, dtype=config.torch_dtype,
        deterministic=config.deterministic_inference, max_context_len=max_context,
        cascade=cascade_policy(config), prefill=config.prefill_attention,
    )
    if config.deterministic_inference:
        from radixrt.kernels.matmul import batch_invariant_linear

        rerouted = set_gemm(loaded.model, batch_invariant_linear)
        logger.info("deterministic inference: %d projections on the batch-invariant GEMM", rerouted)
    sends = tp is not None and tp.size > 1 and tp.rank == 0
    use_graphs = device.type == "cuda" and not config.disable_cuda_graph
    # Piecewise graphs would capture the all-reduces (and the followers run eager steps), and
    # padding is not checked against the batch-invariant kernels: off there.
    piecewise = use_graphs and config.tp_size == 1 and not config.deterministic_inference
    runner = ModelRunner(
        loaded.model, pool, backend,
        graph_max_batch=min(config.cuda_graph_max_batch, config.max_running_requests) if use_graphs else 0,
        # No step is larger than a full prefill budget plus one decode row per running request.
        piecewise_max_tokens=min(config.piecewise_cuda_graph_max_tokens,
                                 config.max_prefill_tokens + config.max_running_requests)
        if piecewise else 0,
        max_pages_per_seq=-(-max_context // config.page_size),
        max_running_requests=config.max_running_requests,
        table_cls=RecordingPageTable if sends else DevicePageTable,
    )
    if sends:
        assert tp is not None and isinstance(runner.page_table, RecordingPageTable)
        runner.plan_sender = PlanSender(tp, runner.page_table)
    return BuiltRunner(loaded, pool, runner, num_pages, max_context)


class Followers:
    """Rank 0's handle on the follower processes of its replica."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], tp: TPGroup) -> None:
        self.procs = procs
        self.tp = tp
        self.closed = False

    def check_alive(self) -> None:
        for rank, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code is not None:
                raise TPPeerLost(
                    f"tensor-parallel peer lost: rank {rank} of {self.tp.size} exited with {code}")

    def close(self, sender: PlanSender | None = None) -> None:
        """Stop every follower (politely, then by kill) and drop the groups. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if sender is not None and all(p.poll() is None for p in self.procs):
            with contextlib.suppress(Exception):  # a dead peer: the kill below still runs
                sender.send_stop()
        for proc in self.procs:
            try:
                proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.tp.close()


def start_tensor_parallel(config: EngineConfig) -> tuple[BuiltRunner, Followers]:
    """Rank 0: spawn ranks 1..tp_size-1, rendezvous, build shard 0. The runner's forward then
    sends every step to the followers; closing it (or this process exiting) stops them."""
    size = config.tp_size
    per_node = size // config.nnodes
    device = torch.device(config.device)
    host, port = rendezvous(config)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The ranks share this process's cores (a --dp worker already has its share); more
        # threads than cores makes every collective wait for a descheduled peer (measured on
        # 2 cores: 7 ms per all-reduce instead of 0.2).
        threads = max(1, threads // per_node)
        torch.set_num_threads(threads)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(1, per_node):  # this node's ranks; other nodes start their own
            procs.append(spawn_follower(config, rank, size, host, port, threads, rank))
        tp = TPGroup.connect(0, size, port, device, host=host)
        followers = Followers(procs, tp)
        check_same_config(tp, config)
        built = build_runner(config, device, tp)
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    sender = built.runner.plan_sender
    assert sender is not None, "rank 0 of a TP group sends plans"
    sender.check_alive = followers.check_alive
    built.runner.tp_followers = followers
    built.runner.on_close.append(lambda: followers.close(sender))
    # Also at interpreter exit and when the runner is collected (in-process engines, tests).
    weakref.finalize(built.runner, followers.close, sender)
    logger.info("tensor parallel: %d ranks on %s (followers %s)", size, config.device,
                [p.pid for p in procs])
    return built, followers
