"""A follower rank: builds its shard, then runs every step rank 0 plans until told to stop.

Started by rank 0 (launch.start_tensor_parallel) as ``python -m radixrt.distributed.follower``
(or by ``radixrt node`` on another host) with a JSON spec on stdin: {"config": EngineConfig
fields, "rank", "size", "host", "port", "threads"}.
"""

from __future__ import annotations

import ctypes
import json
import logging
import signal
import sys

import torch

from radixrt.distributed.group import TPGroup, TPPeerLost
from radixrt.distributed.plan import receive_step
from radixrt.engine.runner import ModelRunner

logger = logging.getLogger("radixrt.follower")


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the one that started it dies (no orphaned ranks even
    when rank 0 is killed with SIGKILL and never closes its connections)."""
    if sys.platform.startswith("linux"):
        with_libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        with_libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


@torch.inference_mode()
def follow(runner: ModelRunner, tp: TPGroup) -> int:
    """Run plans until a stop; returns how many steps ran."""
    steps = 0
    while True:
        batch = receive_step(tp, runner.page_table, runner.pool)
        if batch is None:
            return steps
        runner.forward(batch)  # logits are gathered on every rank; only rank 0 samples
        steps += 1


def main() -> int:
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s follower %(levelname)s %(message)s")
    from radixrt.config import EngineConfig
    from radixrt.distributed.launch import build_runner, check_same_config

    spec = json.loads(sys.stdin.read())
    config = EngineConfig(**spec["config"])
    rank, size = int(spec["rank"]), int(spec["size"])
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(config.seed)
    tp = TPGroup.connect(rank, size, int(spec["port"]), device,
                         host=str(spec.get("host", "127.0.0.1")))
    try:
        check_same_config(tp, config)
        built = build_runner(config, device, tp)
        steps = follow(built.runner, tp)
    except TPPeerLost as e:  # rank 0 went away: nothing left to serve
        logger.warning("rank %d: %s; exiting", rank, e)
        return 1
    logger.info("rank %d: stopped after %d steps", rank, steps)
    tp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
