"""The engine's step path over the device page table (rows kept across steps, only changed pages
written, rows reused after a sequence ends) against one-off batches built from the full page
lists, through the Triton backend; on CUDA the incremental side replays decode CUDA graphs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from radixrt.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from radixrt.cache.allocator import PageAllocator  # noqa: E402
from radixrt.cache.kv_pool import KVPool  # noqa: E402
from radixrt.cache.page_table import SequencePages  # noqa: E402
from radixrt.engine import step_builder  # noqa: E402
from radixrt.engine.batch import build_forward_batch  # noqa: E402
from radixrt.engine.request import SeqStatus, Sequence  # noqa: E402
from radixrt.engine.runner import ModelRunner  # noqa: E402
from radixrt.sampling_params import SamplingParams  # noqa: E402

VOCAB, HEADS, KV_HEADS, DIM, PAGE = 64, 4, 2, 16, 4


class OneAttentionLayer(torch.nn.Module):
    """Embedding (+ a position term) -> one paged attention layer -> logits."""

    def __init__(self, device: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        width = HEADS * DIM
        self.emb = torch.randn(VOCAB, width, generator=g).to(device)
        self.wk = (torch.randn(width, KV_HEADS * DIM, generator=g) / width**0.5).to(device)
        self.wv = (torch.randn(width, KV_HEADS * DIM, generator=g) / width**0.5).to(device)
        self.head = torch.randn(width, VOCAB, generator=g).to(device)

    def forward(self, input_ids, positions, attn):  # type: ignore[no-untyped-def]
        x = self.emb[input_ids] + torch.sin(positions.float())[:, None]
        n = x.shape[0]
        out = attn(0, x.view(n, HEADS, DIM), (x @ self.wk).view(n, KV_HEADS, DIM),
                   (x @ self.wv).view(n, KV_HEADS, DIM))
        return out.reshape(n, HEADS * DIM)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() @ self.head


def _runner(device: str, graphs: bool) -> ModelRunner:
    pool = KVPool(num_layers=1, num_pages=64, page_size=PAGE, num_kv_heads=KV_HEADS,
                  head_dim=DIM, dtype=torch.float32, device=device)
    backend = TritonAttentionBackend(HEADS, KV_HEADS, DIM, DIM**-0.5, device=device,
                                     max_batch_size=8, max_kv_splits=4, min_split_len=16,
                                     num_sms=4 if device == "cpu" else None, max_context_len=64)
    return ModelRunner(OneAttentionLayer(device), pool, backend,
                       graph_max_batch=4 if graphs else 0, max_pages_per_seq=16,
                       max_running_requests=3)


def _seq(rid: str, prompt: list[int]) -> Sequence:
    seq = Sequence(rid=rid, index=0, prompt_ids=prompt, params=SamplingParams(), namespace=None,
                   arrival=0, pages=SequencePages(PAGE))
    seq.status = SeqStatus.RUNNING
    return seq


def test_incremental_rows_match_full_page_lists(device, assert_close):
    torch.manual_seed(1)
    inc, full = _runner(device, graphs=device == "cuda"), _runner(device, graphs=False)
    alloc = PageAllocator(64)
    prompts = {"a": [3, 9, 4, 1, 7, 7, 2], "b": [5, 6], "c": [8] * 10, "d": [1, 2, 3]}
    running = [_seq(r, list(prompts[r])) for r in ("a", "b", "c")]
    graph_steps = 0
    for step in range(12):
        if step == 5:  # "b" ends; "d" arrives and is given b's row
            done = next(s for s in running if s.rid == "b")
            row = done.pages.row
            done.pages.release(alloc)
            running = [s for s in running if s is not done] + [_seq("d", list(prompts["d"]))]
        work = [(s, s.num_tokens - s.kv_len) for s in running]
        for s, n in work:
            assert s.pages.ensure_capacity(s.kv_len + n, alloc)
        built = step_builder.build(work, inc.page_table).forward
        if step == 5:
            assert running[-1].pages.row == row, "the released row is reused"
        one_off = build_forward_batch(
            new_token_ids=[step_builder.token_slice(s, s.kv_len, s.kv_len + n) for s, n in work],
            prefix_lens=[s.kv_len for s, _ in work], page_tables=[s.pages.pages for s, _ in work],
            page_size=PAGE, device=device,
        )
        if inc.graphs is not None and inc.graphs.can_run(built):
            graph_steps += 1
        got, want = inc.forward(built), full.forward(one_off)
        assert_close(got, want)
        for (s, n), token in zip(work, want.argmax(-1).tolist()):
            s.kv_len += n
            s.output_ids.append(int(token) % VOCAB)
    assert inc.page_table.entries_written < sum(s.pages.num_pages for s in running) + 12, (
        "rows are written incrementally, not rebuilt per step"
    )
    if device == "cuda":
        assert graph_steps >= 8, "the decode steps replay CUDA graphs over the device table"
