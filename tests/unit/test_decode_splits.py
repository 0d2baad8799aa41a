"""Decode KV splits chosen by context length (kernels/decode_attention.choose_short_splits) and
the decode graphs that keep one capture per launch variant (engine/cuda_graph.DecodeGraphs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from radixrt.attention.torch_ref import TorchReferenceBackend
from radixrt.attention.triton_backend import TritonAttentionBackend
from radixrt.cache.device_pages import DevicePageTable
from radixrt.cache.kv_pool import KVPool
from radixrt.engine.batch import ForwardBatch, build_forward_batch
from radixrt.engine.cuda_graph import DecodeGraphs
from radixrt.kernels.decode_plan import (
    SHORT_CONTEXT,
    DecodeLaunch,
    choose_num_splits,
    choose_short_splits,
    decode_launch,
)


@pytest.mark.parametrize("batch", [1, 2, 8, 16, 17, 32, 64, 128, 256])
@pytest.mark.parametrize("min_split_len", [64, 256])
def test_short_contexts_never_split_more_than_long_ones(batch, min_split_len):
    short = choose_short_splits(batch, 8, 132, 32, min_split_len)
    assert 1 <= short <= choose_num_splits(batch, 8, 132, 32)
    assert short <= -(-SHORT_CONTEXT // min_split_len), "more splits than a short KV can fill"
    if batch * 8 >= 132:  # the requests alone give every SM a program
        assert short == 1


def test_a_full_gpu_of_requests_runs_in_one_split():
    # 16 requests x 8 KV heads = 128 programs on 132 SMs: a second split would only add the merge.
    assert choose_short_splits(16, 8, 132, 32, 256) == 1
    assert choose_short_splits(8, 8, 132, 32, 256) == 2
    assert choose_short_splits(1, 8, 132, 32, 256) == 8  # capped by SHORT_CONTEXT / 256


def test_decode_tile_follows_programs_per_sm():
    gpu = torch.device("cuda")  # only the device type matters: no GPU needed
    assert decode_launch(16, 8, 132, 1, gpu) == DecodeLaunch(128, 4, 3)  # <= 1 program per SM
    assert decode_launch(32, 8, 132, 1, gpu) == DecodeLaunch(64, 4, 3)
    assert decode_launch(64, 8, 132, 2, gpu) == DecodeLaunch(64, 4, 3), "split steps: default"
    assert decode_launch(64, 8, 132, 1, gpu) == DecodeLaunch(32, 2, 3)
    assert decode_launch(128, 8, 132, 1, gpu) == DecodeLaunch(32, 2, 2)
    assert decode_launch(192, 8, 132, 1, gpu) == DecodeLaunch(32, 2, 3)
    assert decode_launch(256, 8, 132, 1, gpu) == DecodeLaunch(32, 2, 2)
    assert decode_launch(10_000, 8, 132, 1, gpu).block_n == 32
    cpu = decode_launch(64, 8, 132, 1, torch.device("cpu"))
    assert cpu.num_warps == cpu.num_stages == 1, "the interpreter takes the CPU settings"
    with pytest.raises(AssertionError, match="power of two"):
        DecodeLaunch(24, 2, 3)


def test_backend_picks_splits_by_longest_kv():
    backend = TritonAttentionBackend(32, 8, 128, 128**-0.5, device="cpu", num_sms=132)
    assert backend.num_splits_for(64, 512) == 1
    assert backend.num_splits_for(64, SHORT_CONTEXT + 1) == backend.num_splits_for(64) == 5
    assert backend.decode_context_bounds == (SHORT_CONTEXT,)
    assert backend.decode_graph_variant(64, 512) != backend.decode_graph_variant(64, 32768)
    exact = TritonAttentionBackend(32, 8, 128, 128**-0.5, device="cpu", num_sms=132,
                                   deterministic=True)  # fmt: skip
    assert exact.decode_context_bounds == () and exact.decode_graph_variant(64, 512) == 0


class _VariantBackend(TorchReferenceBackend):
    """Two launch variants split at 100 tokens; records what it is prepared with."""

    def __init__(self) -> None:
        super().__init__(4, 2, 8, 8**-0.5)
        self.prepared: list[ForwardBatch] = []

    @property
    def decode_context_bounds(self) -> tuple[int, ...]:
        return (100,)

    def decode_graph_variant(self, batch_size: int, max_seq_len: int) -> int:
        return 1 if max_seq_len <= 100 else 0

    def prepare(self, batch: ForwardBatch) -> None:
        self.prepared.append(batch)


class _Replay:
    def __init__(self, log: list[int], variant: int) -> None:
        self.log, self.variant = log, variant

    def replay(self) -> None:
        self.log.append(self.variant)


def test_graphs_replay_the_variant_the_longest_kv_picks():
    pool = KVPool(num_layers=1, num_pages=256, page_size=4, num_kv_heads=2, head_dim=8,
                  dtype=torch.float32, device="cpu")
    table = DevicePageTable(num_rows=8, max_pages=64, page_size=4, device="cpu")
    backend = _VariantBackend()
    graphs = DecodeGraphs(torch.nn.Identity(), pool, backend, max_batch=4, table=table)
    replayed: list[int] = []
    for variant, bound in ((1, 100), (0, graphs.full_len)):  # what capture() would register
        graphs.bounds[4, variant] = bound
        graphs.graphs[4, False, variant] = _Replay(replayed, variant)  # type: ignore[assignment]
        graphs.outputs[4, False, variant] = torch.zeros(4, 1)

    def step(lens: list[int]) -> ForwardBatch:
        tables = [[1 + 32 * i + j for j in range(32)] for i in range(len(lens))]
        built = build_forward_batch(new_token_ids=[[1]] * len(lens),
                                    prefix_lens=[n - 1 for n in lens], page_tables=tables,
                                    page_size=4, device="cpu")  # fmt: skip
        return dataclasses.replace(built, page_table=table.table)

    for lens, want in (([30, 90, 7], 1), ([30, 101, 7], 0), ([100, 100, 100, 100], 1)):
        batch = step(lens)
        assert graphs.can_run(batch)
        graphs.run(batch)
        assert replayed[-1] == want, (lens, replayed)
        # prepare sees a bound that picks the same variant the graph was captured with
        assert backend.decode_graph_variant(4, backend.prepared[-1].max_seq_len) == want
