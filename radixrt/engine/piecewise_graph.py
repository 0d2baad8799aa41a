"""Piecewise CUDA graphs for prefill and mixed steps: each layer's dense part replays as a graph,
attention runs eagerly between the graphs.

A mixed step's attention depends on every request's lengths (ragged grids, host-planned prefix
tiles), so it cannot be frozen into a graph; everything else in a layer is row-wise (norms,
projections, RoPE, the MLP) and depends on the token count alone. A step of T tokens pads to the
next captured size P >= T, and the model forward is captured as L + 1 graphs split at its
attention calls::

    graph 0      embed, norm, qkv, rope (layer 0)                 -> q/k/v buffers [P]
    attention 0  eager, real rows only: store K/V, attend         -> attention buffer [T]
    graph 1      o_proj, add + norm, MLP (layer 0); norm, qkv, rope (layer 1) -> q/k/v [P]
    ...
    graph L      o_proj, add + norm, MLP (layer L-1), final norm   -> hidden buffer [P]

Padding rows (T .. P-1) compute row-wise garbage nobody reads: attention never sees them and the
logits are gathered from real rows. Tensors crossing a split either live in buffers allocated
once outside the graphs (q/k/v, the attention output, the final hidden state: one set for all
sizes) or, for the residual stream, in graph memory that stays valid because the graphs of one
size replay in the order they were captured and nothing else writes their pool in between.

Eager mixed steps were host-bound (bench/RESULTS.md, session 7: chat's GPU was busy 1.28 s of a
2.71 s wall, ~13 launches per layer); a replay is one launch for the whole dense part.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from radixrt.attention.base import AttentionBackend
from radixrt.cache.kv_pool import KVPool
from radixrt.engine.batch import ForwardBatch
from radixrt.engine.cuda_graph import capture_stream

logger = logging.getLogger(__name__)


# Captured sizes are this many tokens apart. A padding row costs as much as a real one in the
# projections: on an H200 (bench/RESULTS.md, session 9) chat ran 1.48 s with sizes 16 apart
# (captured in 6.3-6.9 s) against 1.53 s with 32 sizes (padding < 32 tokens or 1/8).
SIZE_STEP = 16


def piecewise_sizes(max_tokens: int) -> list[int]:
    """Captured token counts up to ``max_tokens``: every multiple of SIZE_STEP below it, and
    ``max_tokens`` itself, so a step pads by less than SIZE_STEP tokens."""
    assert max_tokens >= 1, f"max_tokens must be positive, got {max_tokens}"
    return list(range(SIZE_STEP, max_tokens, SIZE_STEP)) + [max_tokens]


def fused_qkv_view(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """q [T, Hq, D], k / v [T, Hkv, D] as one [T, (Hq + 2 Hkv) D] view when they are adjacent
    column blocks of one row-major tensor (the fused qkv projection's output), else None::

        row t:  | q heads (Hq D) | k heads (Hkv D) | v heads (Hkv D) |   stride(0) = the sum
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    width = (hq + 2 * hkv) * d
    el = q.element_size()
    views_ok = all(x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == d
                   and x.stride(0) == width and x.dtype == q.dtype and x.shape[0] == t
                   for x in (q, k, v))  # fmt: skip
    if not (views_ok and v.shape[1] == hkv and k.shape[2] == d == v.shape[2]):
        return None
    base = q.data_ptr()
    if k.data_ptr() != base + hq * d * el or v.data_ptr() != base + (hq + hkv) * d * el:
        return None
    return q.as_strided((t, width), (width, 1))


class PiecewiseGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        pool: KVPool,
        backend: AttentionBackend,
        *,
        max_tokens: int,
        mempool: Any = None,
    ) -> None:
        """``mempool``: a graph memory pool to share (the decode graphs'), else a new one."""
        self.model = model
        self.pool = pool
        self.backend = backend
        self.max_tokens = max_tokens
        self.sizes = piecewise_sizes(max_tokens)
        dev, dtype = pool.device, pool.dtype
        heads, kv_heads, dim = backend.num_heads, backend.num_kv_heads, backend.head_dim
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        # q | k | v side by side per token, as the fused qkv projection lays them out, so the
        # attention sees the same strides as in an eager step (the same kernel specializations).
        self._qkv = torch.zeros(max_tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, device=dev)
        q, k, v = self._qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        self._q = q.view(max_tokens, heads, dim)
        self._k = k.view(max_tokens, kv_heads, dim)
        self._v = v.view(max_tokens, kv_heads, dim)
        self._attn_out = torch.zeros(max_tokens, heads, dim, dtype=dtype, device=dev)
        self._hidden: torch.Tensor | None = None  # [max_tokens, H], sized by the first pass
        self.mempool = mempool if mempool is not None else torch.cuda.graph_pool_handle()
        # Per size: the L + 1 graphs, and the layer whose attention runs after graph i.
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.layer_ids: dict[int, list[int]] = {}
        self.replayed_steps = 0  # steps run through the graphs (tests, benchmarks)
        self.capture_s = 0.0

    # ------------------------------------------------------------------ capture

    def _split_attn(self, size: int) -> Any:
        """The attn callback of a capture pass: park q/k/v, end this graph, begin the next."""
        graphs, layer_ids = self.graphs[size], self.layer_ids[size]

        def attn(layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            fused = fused_qkv_view(q, k, v)
            if fused is not None:  # one copy, not three (the fused projection's own layout)
                self._qkv[:size].copy_(fused)
            else:
                self._q[:size].copy_(q)
                self._k[:size].copy_(k)
                self._v[:size].copy_(v)
            graphs[-1].capture_end()
            layer_ids.append(layer_id)
            graphs.append(torch.cuda.CUDAGraph())
            graphs[-1].capture_begin(pool=self.mempool)
            return self._attn_out[:size]

        return attn

    def _warm_attn(self, size: int) -> Any:
        def attn(layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self._attn_out[:size]

        return attn

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        with capture_stream(self.pool.device) as stream:
            for size in reversed(self.sizes):  # largest first so smaller ones reuse its memory
                # An eager pass first: Triton compiles (and cuBLAS picks) outside the capture.
                hidden = self.model(self.input_ids[:size], self.positions[:size],
                                    self._warm_attn(size))  # [P, H]
                if self._hidden is None:
                    self._hidden = hidden.new_zeros(self.max_tokens, hidden.shape[1])
                del hidden
                stream.synchronize()
                try:
                    self._capture_one(size)
                except Exception as exc:
                    raise RuntimeError(
                        f"piecewise CUDA-graph capture failed at {size} tokens ({exc}); "
                        "EngineConfig(piecewise_cuda_graph_max_tokens=0) / "
                        "--piecewise-cuda-graph-max-tokens 0 runs these steps eagerly") from exc
        count = sum(len(g) for g in self.graphs.values())
        self.capture_s = time.perf_counter() - start
        logger.info("captured %d piecewise CUDA graphs (%d sizes, steps <= %d tokens) in %.1fs",
                    count, len(self.sizes), self.max_tokens, self.capture_s)

    def _capture_one(self, size: int) -> None:
        assert self._hidden is not None, "the eager pass sizes the hidden buffer"
        self.graphs[size] = [torch.cuda.CUDAGraph()]
        self.layer_ids[size] = []
        graphs = self.graphs[size]
        graphs[0].capture_begin(pool=self.mempool)
        try:
            hidden = self.model(self.input_ids[:size], self.positions[:size],
                                self._split_attn(size))  # [P, H]
            self._hidden[:size].copy_(hidden)
        finally:
            graphs[-1].capture_end()
        assert len(graphs) == len(self.layer_ids[size]) + 1, "one graph more than attention calls"

    # ------------------------------------------------------------------ replay

    def can_run(self, batch: ForwardBatch) -> bool:
        return bool(self.graphs) and batch.num_tokens <= self.max_tokens

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """The model's hidden states of the step's real rows: [T, H] (a view of a buffer the
        next step overwrites)."""
        n = batch.num_tokens
        size = next(s for s in self.sizes if s >= n)
        # Padding rows keep an earlier step's ids and positions: valid inputs, unread outputs.
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.backend.prepare(batch)
        q, k, v, out = self._q[:n], self._k[:n], self._v[:n], self._attn_out[:n]
        graphs = self.graphs[size]
        for graph, layer_id in zip(graphs, self.layer_ids[size]):
            graph.replay()
            self.backend.forward(layer_id, q, k, v, self.pool, batch, out=out)
        graphs[-1].replay()
        self.replayed_steps += 1
        assert self._hidden is not None, "run before capture"
        return self._hidden[:n]
