"""CUDA graphs for decode steps: one graph per captured batch size, replayed over static buffers.

A decode batch of B requests pads to the next captured size P >= B. The graphs read pages from
the runner's device page table itself (captured once, updated in place by each step), so a
replay copies only the per-request vectors. Padding rows point at the table's scratch row 0
(all page 0) with seq_len 1, so they compute garbage nobody reads and write only scratch memory:

    static rows   0 .. B-1  real requests (ids, positions, slots, seq lens, table rows copied in)
                  B .. P-1  padding: id 0, position 0, slot 0, seq_len 1, row 0

With a cascade backend every size is captured twice: without groups, and with (the backend's
fixed cascade buffers hold the step's grouping, written by ``prepare`` before the replay; padding
rows are in no group). A step carrying groups replays the second; with a backend that cannot
capture grouped steps (``cascade_in_cuda_graph`` False) it runs eagerly instead. A backend whose
decode launches depend on the longest KV (``decode_context_bounds``: fewer KV splits for short
contexts) gets one graph per distinct variant, and a step replays the one its longest KV picks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from radixrt.attention.base import AttentionBackend
from radixrt.cache.device_pages import DevicePageTable
from radixrt.cache.kv_pool import KVPool
from radixrt.engine.batch import ForwardBatch
from radixrt.engine.cascade_groups import CascadeGroups

logger = logging.getLogger(__name__)


@contextmanager
def capture_stream(device: torch.device) -> Iterator[torch.cuda.Stream]:
    """A side stream to capture graphs on: it starts after the current stream's queued work,
    and the current stream waits for it (and the device is synchronized) when the block ends."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield stream
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize(device)


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
             448, 512]
    out = [s for s in sizes if s < max_batch]
    return out + [max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        pool: KVPool,
        backend: AttentionBackend,
        *,
        max_batch: int,
        table: DevicePageTable,
    ) -> None:
        self.model = model
        self.pool = pool
        self.backend = backend
        self.max_batch = max_batch
        self.table = table
        self.page_size = pool.page_size
        dev = pool.device
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.prefix_lens = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.req_rows = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.out_slots = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.qo_indptr = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(max_batch, dtype=torch.int64, device=dev)
        self.sizes = capture_sizes(max_batch)
        # Keyed (size, with cascade groups, the backend's launch variant).
        self.graphs: dict[tuple[int, bool, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool, int], torch.Tensor] = {}
        # (size, variant) -> a longest-KV bound that picks the variant (prepare sees it).
        self.bounds: dict[tuple[int, int], int] = {}
        self.full_len = table.max_pages * self.page_size  # no sequence is longer
        policy = backend.cascade_policy
        self.modes = [False, True] if policy is not None and backend.cascade_in_cuda_graph else [False]
        backend.prepare_graph_sizes(self.sizes)
        self._min_group = policy.min_group if policy is not None else 0
        self.mempool: Any = None
        self.capture_s = 0.0

    def _static_batch(self, size: int, cascade: CascadeGroups | None = None,
                      real: ForwardBatch | None = None,
                      max_seq_len: int | None = None) -> ForwardBatch:
        # Host lengths and rows of the ``real`` batch copied in (padding: length 1, row 0), for a
        # backend whose prepare plans from them (FlashInfer).
        pad = [0] * (size - (real.batch_size if real is not None else 0))
        prefix = (real.prefix_lens_cpu if real is not None else []) + pad
        rows = (real.req_rows_cpu if real is not None else []) + pad
        return ForwardBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size],
            qo_indptr=self.qo_indptr[: size + 1], prefix_lens=self.prefix_lens[:size],
            seq_lens=self.seq_lens[:size], page_table=self.table.table,
            req_rows=self.req_rows[:size],
            out_slots=self.out_slots[:size], logits_indices=self.logits_indices[:size],
            page_size=self.page_size, is_decode=True, max_extend_len=1,
            max_seq_len=self.full_len if max_seq_len is None else max_seq_len,
            extend_lens_cpu=[1] * size,
            prefix_lens_cpu=prefix, req_rows_cpu=rows, cascade=cascade,
        )

    def _run_model(self, batch: ForwardBatch) -> torch.Tensor:
        pool, backend = self.pool, self.backend

        def attn(layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return backend.forward(layer_id, q, k, v, pool, batch)

        hidden = self.model(batch.input_ids, batch.positions, attn)
        return self.model.compute_logits(hidden)  # type: ignore[operator,no-any-return]

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        with capture_stream(self.pool.device) as stream:
            for size in reversed(self.sizes):  # largest first so smaller ones reuse its memory
                for bound in (*self.backend.decode_context_bounds, self.full_len):
                    variant = self.backend.decode_graph_variant(size, bound)
                    if (size, variant) in self.bounds:
                        continue  # a smaller bound already picked this launch shape
                    self.bounds[size, variant] = bound
                    for grouped in self.modes:
                        if grouped and size < self._min_group:
                            continue  # no group fits
                        self._capture_one(size, grouped, variant, stream)
        self.capture_s = time.perf_counter() - start
        logger.info("captured %d decode CUDA graphs (batch <= %d) in %.1fs",
                    len(self.graphs), self.max_batch, self.capture_s)

    def _capture_one(self, size: int, grouped: bool, variant: int,
                     stream: torch.cuda.Stream) -> None:
        batch = self._static_batch(size, CascadeGroups.empty() if grouped else None,
                                   max_seq_len=self.bounds[size, variant])
        self.backend.prepare(batch)
        for _ in range(2):  # warm up: Triton compiles and autotunes outside the graph
            self._run_model(batch)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool, stream=stream):
            self.outputs[size, grouped, variant] = self._run_model(batch)
        if self.mempool is None:
            self.mempool = graph.pool()
        self.graphs[size, grouped, variant] = graph

    def can_run(self, batch: ForwardBatch) -> bool:
        # A batch built on another table (tests' one-off batches) cannot use these graphs.
        return (
            batch.is_decode and batch.batch_size <= self.max_batch
            and batch.page_table is self.table.table and bool(self.graphs)
            and (batch.cascade is None or self.backend.cascade_in_cuda_graph)
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay the graph of the smallest captured size >= the batch; logits [B, vocab]."""
        bsz = batch.batch_size
        size = next(s for s in self.sizes if s >= bsz)
        self.input_ids[:bsz].copy_(batch.input_ids)
        self.positions[:bsz].copy_(batch.positions)
        self.seq_lens[:bsz].copy_(batch.seq_lens)
        self.prefix_lens[:bsz].copy_(batch.prefix_lens)
        self.out_slots[:bsz].copy_(batch.out_slots)
        self.req_rows[:bsz].copy_(batch.req_rows)
        if size > bsz:
            self._reset_rows(bsz, size)
        variant = self.backend.decode_graph_variant(size, batch.max_seq_len)
        if (size, variant) not in self.bounds:  # not captured: the unbounded step's variant
            variant = self.backend.decode_graph_variant(size, self.full_len)
        grouped = batch.cascade is not None and (size, True, variant) in self.graphs
        key = (size, grouped, variant)
        self.backend.prepare(self._static_batch(size, batch.cascade if grouped else None, batch,
                                                self.bounds[size, variant]))  # fmt: skip
        self.graphs[key].replay()
        return self.outputs[key][:bsz]

    def _reset_rows(self, start: int, end: int) -> None:
        self.input_ids[start:end].zero_()
        self.positions[start:end].zero_()
        self.seq_lens[start:end].fill_(1)
        self.prefix_lens[start:end].zero_()
        self.out_slots[start:end].zero_()
        self.req_rows[start:end].zero_()

