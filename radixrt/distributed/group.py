"""A tensor-parallel group: this rank's index, the collectives the model needs, and the control
channel rank 0 uses to send each step's plan.

    device group  NCCL on CUDA, gloo on CPU: all-reduce / all-gather of activations, broadcast of
                  the step's device tensors (input ids filled on the device by overlap)
    control group gloo over TCP: the step plan as one host int64 message (followers need host
                  values for kernel grids and the reference backend without a device sync)

The groups are built from ProcessGroup objects over one TCPStore, not torch's global default
group, so several engines (tests) can live in one process and be torn down independently.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

# A follower that has not answered by then is gone (its death usually shows much sooner, as a
# closed connection).
DEFAULT_TIMEOUT_S = 600.0
# Followers join the rendezvous right after importing torch (before loading their shard).
JOIN_TIMEOUT_S = 120.0


class TPPeerLost(RuntimeError):
    """A tensor-parallel rank died or stopped answering: this replica cannot run another step.
    core.is_device_fault treats it as a device fault, so the worker is replaced."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TPGroup:
    rank: int
    size: int
    device: torch.device
    # c10d backends (ProcessGroupGloo / ProcessGroupNCCL objects, called directly).
    device_pg: Any = None
    control_pg: Any = None
    store: dist.Store | None = field(default=None, repr=False)

    @staticmethod
    def single(device: torch.device) -> TPGroup:
        return TPGroup(0, 1, device)

    @staticmethod
    def connect(rank: int, size: int, port: int, device: torch.device,
                host: str = "127.0.0.1", timeout_s: float = DEFAULT_TIMEOUT_S) -> TPGroup:
        """Rendezvous of ``size`` ranks on rank 0's TCPStore at host:port."""
        assert 0 <= rank < size, f"rank {rank} outside a group of {size}"
        timeout = datetime.timedelta(seconds=timeout_s)
        join = datetime.timedelta(seconds=min(timeout_s, JOIN_TIMEOUT_S))
        try:
            store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=join)
        except RuntimeError as e:  # DistStoreError: a rank never joined (it died at start-up)
            raise TPPeerLost(f"tensor-parallel peer lost: {size} ranks did not meet at "
                             f"{host}:{port} within {join.total_seconds():.0f}s: {e}") from e
        control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, timeout)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            devpg: Any = dist.ProcessGroupNCCL(
                dist.PrefixStore("nccl", store), rank, size, opts)
        else:
            devpg = dist.ProcessGroupGloo(dist.PrefixStore("device", store), rank, size, timeout)
        return TPGroup(rank, size, device, devpg, control, store)

    # ---- activations (every rank calls these in the same order) --------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks in place (the row-parallel projections' partial outputs)."""
        if self.size == 1:
            return x
        assert self.device_pg is not None, "TP group not connected"
        self._wait(self.device_pg.allreduce([x]))
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] per rank -> [..., size * n], rank order (vocab-parallel logits)."""
        if self.size == 1:
            return x
        assert self.device_pg is not None, "TP group not connected"
        x = x.contiguous()
        outs = [torch.empty_like(x) for _ in range(self.size)]
        self._wait(self.device_pg.allgather([outs], [x]))
        return torch.cat(outs, dim=-1)

    def broadcast_device(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (same shape and dtype everywhere)."""
        if self.size == 1:
            return x
        assert self.device_pg is not None, "TP group not connected"
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._wait(self.device_pg.broadcast([x], opts))
        return x

    # ---- control channel ------------------------------------------------------------------
    def send_plan(self, message: torch.Tensor) -> None:
        """Rank 0: one int64 host message to every follower (length first, then the body)."""
        assert self.rank == 0 and self.control_pg is not None, "only rank 0 sends plans"
        assert message.dtype == torch.int64 and message.dim() == 1, "plans are 1-D int64"
        self._control_bcast(torch.tensor([message.numel()], dtype=torch.int64))
        self._control_bcast(message)

    def recv_plan(self) -> torch.Tensor:
        assert self.rank != 0 and self.control_pg is not None, "rank 0 sends, never receives"
        length = torch.zeros(1, dtype=torch.int64)
        self._control_bcast(length)
        body = torch.empty(int(length.item()), dtype=torch.int64)
        self._control_bcast(body)
        return body

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over ranks (the KV pool is sized by the tightest rank)."""
        if self.size == 1:
            return value
        assert self.control_pg is not None, "TP group not connected"
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp(dist.ReduceOp.MIN)
        self._wait(self.control_pg.allreduce([t], opts))
        return int(t.item())

    def _control_bcast(self, t: torch.Tensor) -> None:
        assert self.control_pg is not None, "TP group not connected"
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._wait(self.control_pg.broadcast([t], opts))

    def _wait(self, work: dist.Work) -> None:
        try:
            work.wait()
        except RuntimeError as e:  # gloo: connection closed / timeout; NCCL: comm aborted
            raise TPPeerLost(f"tensor-parallel peer lost (rank {self.rank} of {self.size}): {e}") from e

    def close(self) -> None:
        for pg in (self.device_pg, self.control_pg):
            if pg is not None and hasattr(pg, "shutdown"):
                with contextlib.suppress(Exception):  # a dead peer may make it fail
                    pg.shutdown()
        self.device_pg = self.control_pg = None
        self.store = None
