"""Model runner: owns the model, the KV pool, the device page table and the attention backend;
runs one forward step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from radixrt.attention.base import AttentionBackend
from radixrt.cache.device_pages import DevicePageTable, rows_needed
from radixrt.cache.kv_pool import KVPool
from radixrt.engine.batch import ForwardBatch
from radixrt.engine.cascade_groups import CascadePolicy, PrefixGrouper
from radixrt.engine.cuda_graph import DecodeGraphs
from radixrt.engine.outputs import FORWARD_PATHS
from radixrt.engine.piecewise_graph import PiecewiseGraphs

if TYPE_CHECKING:
    from radixrt.config import EngineConfig
    from radixrt.distributed.launch import Followers
    from radixrt.distributed.plan import PlanSender

logger = logging.getLogger(__name__)

# What cascade_decode="auto" means on CUDA with the Triton backend. On: the H200 run of
# bench/gpu_cascade.sh (bench/RESULTS.md, session 4) had gsp at 0.743x the time, 0.707x the ITL.
CASCADE_AUTO_ON_CUDA = True


def cascade_policy(config: EngineConfig) -> CascadePolicy | None:
    """The shared-prefix decode policy ``config`` asks for (None: off)."""
    mode = config.cascade_decode
    backend = config.attention_backend
    if mode == "auto":
        # FlashInfer's cascade (attention/flashinfer_cascade.py) is not measured in the engine
        # yet: auto leaves it off there.
        on_triton = backend == "triton" or (backend == "auto" and config.device != "cpu")
        mode = "on" if (CASCADE_AUTO_ON_CUDA and config.device != "cpu" and on_triton
                        and not config.deterministic_inference) else "off"
    if mode == "off":
        return None
    return CascadePolicy(config.cascade_min_shared_pages, config.cascade_min_group)


def make_attention_backend(
    name: str, device: torch.device, *, num_heads: int, num_kv_heads: int, head_dim: int,
    max_batch: int, dtype: torch.dtype, deterministic: bool = False, max_context_len: int = 8192,
    cascade: CascadePolicy | None = None, prefill: str = "triton",
) -> AttentionBackend:
    """``prefill`` 'flashinfer': the triton backend's extend steps run on FlashInfer's paged
    prefill (``EngineConfig.prefill_attention``)."""
    # ``deterministic`` (triton only) is checked against the backend by EngineConfig.
    scale = head_dim**-0.5
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from radixrt.attention.torch_ref import TorchReferenceBackend

        return TorchReferenceBackend(num_heads, num_kv_heads, head_dim, scale, cascade=cascade)
    if name == "triton":
        from radixrt.attention.triton_backend import TritonAttentionBackend

        delegate = None
        if prefill == "flashinfer":
            from radixrt.attention.flashinfer_backend import FlashInferBackend

            delegate = FlashInferBackend(num_heads, num_kv_heads, head_dim, scale, device=device,
                                         dtype=dtype, max_batch_size=max(max_batch, 1),
                                         max_context_len=max_context_len)
        return TritonAttentionBackend(num_heads, num_kv_heads, head_dim, scale, device=device,
                                      max_batch_size=max(max_batch, 1),
                                      deterministic=deterministic,
                                      max_context_len=max_context_len, cascade=cascade,
                                      extend_delegate=delegate)
    assert prefill == "triton", f"prefill_attention={prefill!r} needs the triton backend"
    if name == "flashinfer":
        from radixrt.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(num_heads, num_kv_heads, head_dim, scale, device=device,
                                 dtype=dtype, max_batch_size=max(max_batch, 1),
                                 max_context_len=max_context_len, cascade=cascade)
    raise ValueError(f"unknown attention backend {name!r}")


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        pool: KVPool,
        backend: AttentionBackend,
        *,
        graph_max_batch: int = 0,
        piecewise_max_tokens: int = 0,
        max_pages_per_seq: int = 0,
        max_running_requests: int = 256,
        table_cls: type[DevicePageTable] = DevicePageTable,
    ) -> None:
        """``max_pages_per_seq`` 0: as many as the pool holds (no sequence can hold more).
        ``max_running_requests`` sizes the device page table (EngineCore passes its config's).
        ``table_cls``: the page table's class (tensor-parallel rank 0 records its writes).
        ``piecewise_max_tokens`` > 0 (CUDA): other steps of up to that many tokens replay
        piecewise graphs (engine/piecewise_graph.py)."""
        self.model = model
        self.pool = pool
        self.backend = backend
        self.device = pool.device
        max_pages = min(max_pages_per_seq, pool.num_pages) if max_pages_per_seq > 0 else pool.num_pages
        # The scheduler stages changed pages into it; the backends and graphs read it.
        self.page_table = table_cls(num_rows=rows_needed(max_running_requests),
                                    max_pages=max_pages, page_size=pool.page_size,
                                    device=self.device)
        # Tensor-parallel rank 0: sends each step to the follower ranks before running it.
        self.plan_sender: PlanSender | None = None
        self.on_close: list[Callable[[], None]] = []  # run once by close() (TP: stop followers)
        self.tp_followers: Followers | None = None  # TP rank 0: the other ranks' processes
        # Groups decode steps by shared cached prefix when the backend reads them (cascade).
        policy = backend.cascade_policy
        self.cascade = PrefixGrouper(policy, pool.page_size) if policy is not None else None
        # Steps run so far by path (engine stats, /metrics): did the graphs serve the traffic?
        self.forward_steps = dict.fromkeys(FORWARD_PATHS, 0)
        self.graphs: DecodeGraphs | None = None
        if graph_max_batch > 0 and self.device.type == "cuda" and backend.supports_cuda_graph:
            self.graphs = DecodeGraphs(model, pool, backend, max_batch=graph_max_batch,
                                       table=self.page_table)
            self.graphs.capture()
        self.piecewise: PiecewiseGraphs | None = None
        if piecewise_max_tokens > 0 and self.device.type == "cuda":
            self.piecewise = PiecewiseGraphs(
                model, pool, backend, max_tokens=piecewise_max_tokens,
                mempool=self.graphs.mempool if self.graphs is not None else None)
            self.piecewise.capture()

    def close(self) -> None:
        """Release what outlives the process's objects (the follower ranks under TP)."""
        hooks, self.on_close = self.on_close, []
        for hook in hooks:
            hook()

    def check_peers(self) -> None:
        """TP rank 0: raise TPPeerLost if a follower process has exited."""
        if self.tp_followers is not None:
            self.tp_followers.check_alive()

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy whole KV pages (forks), on every tensor-parallel rank's shard."""
        self.pool.copy_pages(src, dst)
        if self.plan_sender is not None:
            self.plan_sender.queue_copy(src, dst)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run one step; returns float32 logits for ``batch.logits_indices`` rows: [N, vocab]."""
        if self.plan_sender is not None:
            self.plan_sender.send_forward(batch)
        if self.graphs is not None and self.graphs.can_run(batch):
            self.forward_steps["decode_graph"] += 1
            return self.graphs.run(batch)
        if self.piecewise is not None and self.piecewise.can_run(batch):
            self.forward_steps["piecewise_graph"] += 1
            hidden = self.piecewise.run(batch)  # [T, hidden]
        else:
            self.forward_steps["eager"] += 1
            hidden = self._eager_hidden(batch)
        return self.model.compute_logits(hidden[batch.logits_indices])  # type: ignore[operator,no-any-return]

    def _eager_hidden(self, batch: ForwardBatch) -> torch.Tensor:  # [T, hidden]
        self.backend.prepare(batch)
        pool, backend = self.pool, self.backend

        def attn(layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return backend.forward(layer_id, q, k, v, pool, batch)

        return self.model(batch.input_ids, batch.positions, attn)  # type: ignore[no-any-return]
