"""TritonAttentionBackend end to end over a real KVPool: a mixed prefill/decode step then a pure
decode step, against the torch reference backend running the same steps on its own pool."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("triton")

from radixrt.attention.torch_ref import TorchReferenceBackend, paged_attention_reference  # noqa: E402
from radixrt.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from radixrt.cache.kv_pool import KVPool  # noqa: E402
from radixrt.engine.batch import ForwardBatch, build_forward_batch  # noqa: E402


def _pools(device, dtype, num_pages, page_size, kv_heads, head_dim) -> tuple[KVPool, KVPool]:
    def make() -> KVPool:
        return KVPool(num_layers=2, num_pages=num_pages, page_size=page_size,
                      num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=device)  # fmt: skip

    return make(), make()


def _step(batch: ForwardBatch, heads, kv_heads, head_dim, dtype, device):
    t = batch.num_tokens
    q = torch.randn(t, heads, head_dim, device=device).to(dtype)
    k = torch.randn(t, kv_heads, head_dim, device=device).to(dtype)
    v = torch.randn(t, kv_heads, head_dim, device=device).to(dtype)
    return q, k, v


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    ("dtype", "page_size"), [(torch.float32, 1), (torch.bfloat16, 16), (torch.float16, 4)]
)
def test_backend_mixed_then_decode(device, assert_close, dtype, page_size, deterministic):
    if device == "cuda":
        heads, kv_heads, head_dim = 32, 8, 128
        cached, new = [0, 700, 1500, 33], [600, 1, 200, 1]  # requests 1 and 3 are decoding
    else:
        heads, kv_heads, head_dim = 8, 2, 32
        cached, new = [0, 40, 21, 9], [18, 1, 5, 1]
    scale = head_dim**-0.5
    decode_steps = 3 if device == "cuda" else 1
    lens = [c + n + decode_steps for c, n in zip(cached, new)]
    pages = [-(-n // page_size) for n in lens]
    perm = (torch.randperm(sum(pages) + 2) + 1).tolist()
    tables = [perm[sum(pages[:i]) : sum(pages[: i + 1])] for i in range(len(pages))]
    tri_pool, ref_pool = _pools(device, dtype, sum(pages) + 2, page_size, kv_heads, head_dim)
    # The "cached" prefixes: already in the pool from earlier steps.
    for i, c in enumerate(cached):
        pos = torch.arange(c)
        slots = (torch.tensor(tables[i])[pos // page_size] * page_size + pos % page_size).to(device)
        for layer in range(2):
            kk = torch.randn(c, kv_heads, head_dim, device=device)
            vv = torch.randn(c, kv_heads, head_dim, device=device)
            tri_pool.store(layer, slots, kk, vv)
            ref_pool.store(layer, slots, kk, vv)

    triton_backend = TritonAttentionBackend(
        heads, kv_heads, head_dim, scale, device=device, max_batch_size=8, max_kv_splits=4,
        min_split_len=16 if device == "cpu" else 256,
        num_sms=16 if device == "cpu" else None,
        deterministic=deterministic, max_context_len=8192 if device == "cuda" else 64,
    )  # fmt: skip
    ref_backend = TorchReferenceBackend(heads, kv_heads, head_dim, scale)

    mixed = build_forward_batch(
        new_token_ids=[[1] * n for n in new], prefix_lens=cached, page_tables=tables,
        page_size=page_size, device=device,
    )  # fmt: skip
    assert not mixed.is_decode, "the first step mixes prefill and decode requests"
    steps = [mixed]
    done = [c + n for c, n in zip(cached, new)]
    for s in range(decode_steps):
        steps.append(
            build_forward_batch(
                new_token_ids=[[1]] * len(new),
                prefix_lens=[d + s for d in done],
                page_tables=tables,
                page_size=page_size,
                device=device,
            )  # fmt: skip
        )
    if device == "cpu" and not deterministic:  # the short-context split count, as prepared
        splits = triton_backend.num_splits_for(len(new), max(lens))
        assert splits > 1, "decode must exercise several splits"
    for i, batch in enumerate(steps):
        q, k, v = _step(batch, heads, kv_heads, head_dim, dtype, device)
        triton_backend.prepare(batch)
        ref_backend.prepare(batch)
        if deterministic:  # small decode batches take the chunked KV split
            assert triton_backend.kv_split == batch.is_decode
        # Even steps write into a caller's buffer (as piecewise graphs do), odd ones allocate.
        given = (torch.full_like(q, float("nan")), torch.full_like(q, float("nan")))
        tri_out, ref_out = given if i % 2 == 0 else (None, None)
        out = triton_backend.forward(1, q, k, v, tri_pool, batch, out=tri_out)
        ref = ref_backend.forward(1, q, k, v, ref_pool, batch, out=ref_out)
        if i % 2 == 0:
            assert out is given[0] and ref is given[1], "out= must be filled and returned"
        assert_close(out, ref)
    assert torch.equal(tri_pool.k(1), ref_pool.k(1)) or device == "cpu", "K pool contents differ"
    assert_close(tri_pool.k(1), ref_pool.k(1))
    assert_close(tri_pool.v(1), ref_pool.v(1))
    assert torch.equal(tri_pool.k(0), ref_pool.k(0)), "layer 0 must be untouched"


@pytest.mark.gpu
@pytest.mark.parametrize("captured_longest", [4000, 1500])
def test_decode_replays_in_cuda_graph(device, assert_close, captured_longest):
    """A decode step captured once replays correctly after the batch's contents change, also
    over KVs longer than the one it was captured with (which chose its split count)."""
    heads, kv_heads, head_dim, page_size, dtype = 32, 8, 128, 16, torch.bfloat16
    bs, max_pages = 4, 256
    pool = KVPool(num_layers=1, num_pages=bs * max_pages, page_size=page_size,
                  num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=device)  # fmt: skip
    pool.k(0).normal_()
    pool.v(0).normal_()
    backend = TritonAttentionBackend(heads, kv_heads, head_dim, head_dim**-0.5, device=device)
    tables = (torch.randperm(bs * max_pages) + 1).view(bs, max_pages).tolist()

    def decode_batch(lens: list[int]) -> ForwardBatch:
        return build_forward_batch(new_token_ids=[[1]] * bs, prefix_lens=[n - 1 for n in lens],
                                   page_tables=tables, page_size=page_size, device=device)  # fmt: skip

    static = decode_batch([100, 1000, 37, captured_longest])
    q = torch.randn(bs, heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(bs, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    backend.prepare(static)
    backend.forward(0, q, k, v, pool, static)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(0, q, k, v, pool, static)
    for lens in ([4000, 1, 513, 77], [16, 4096, 2048, 999]):
        fresh = decode_batch(lens)
        for name in ("seq_lens", "page_table", "req_rows", "out_slots", "prefix_lens", "qo_indptr"):
            getattr(static, name).copy_(getattr(fresh, name))
        q.normal_()
        k.normal_()
        v.normal_()
        out.fill_(float("nan"))
        graph.replay()
        ref_backend = TorchReferenceBackend(heads, kv_heads, head_dim, head_dim**-0.5)
        ref = ref_backend.forward(0, q, k, v, pool, fresh)  # stores the same K/V again
        assert_close(out, ref)


@pytest.mark.parametrize("deterministic", [False, True])
def test_kernels_read_no_table_entry_past_a_request(device, assert_close, deterministic):
    """In the engine's device page table a row's entries past the request's last page hold an
    earlier owner's pages. Here they point at a page of NaNs: any read of them shows."""
    heads, kv_heads, head_dim, ps = 4, 2, 16, 4
    cached, new = [13, 0, 7], [1, 6, 1]
    need = [-(-(c + n) // ps) for c, n in zip(cached, new)]
    poison = sum(need) + 1
    pool = KVPool(num_layers=1, num_pages=poison, page_size=ps, num_kv_heads=kv_heads,
                  head_dim=head_dim, dtype=torch.float32, device=device)  # fmt: skip
    pool.k(0).normal_()
    pool.v(0).normal_()
    pool.k(0)[poison] = float("nan")
    pool.v(0)[poison] = float("nan")
    perm = (torch.randperm(poison - 1) + 1).tolist()
    tables = [perm[sum(need[:i]) : sum(need[: i + 1])] + [poison] * 3 for i in range(3)]
    backend = TritonAttentionBackend(
        heads, kv_heads, head_dim, head_dim**-0.5, device=device, max_batch_size=4,
        max_kv_splits=4, min_split_len=16 if device == "cpu" else 256,
        num_sms=4 if device == "cpu" else None, deterministic=deterministic, max_context_len=64,
    )  # fmt: skip
    for decode in (False, True):
        ext = [1, 1, 1] if decode else new
        batch = build_forward_batch(new_token_ids=[[1] * e for e in ext], prefix_lens=cached,
                                    page_tables=tables, page_size=ps, device=device)  # fmt: skip
        q, k, v = _step(batch, heads, kv_heads, head_dim, torch.float32, device)
        backend.prepare(batch)
        out = backend.forward(0, q, k, v, pool, batch)
        ref = TorchReferenceBackend(heads, kv_heads, head_dim, head_dim**-0.5)
        assert_close(out, ref.forward(0, q, k, v, pool, batch))


class _ReferenceDelegate:
    """An extend delegate running the torch reference over the paged layer it is handed."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.prepared: list[ForwardBatch] = []
        self.attended: list[tuple[torch.Tensor, torch.Tensor]] = []

    def prepare(self, batch: ForwardBatch) -> None:
        self.prepared.append(batch)

    def attend(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.attended.append(kv)
        k, v = (t.flatten(0, 1) for t in kv)
        return paged_attention_reference(q, k, v, self.prepared[-1], self.scale)


def test_extend_steps_go_to_the_delegate_and_decode_stays_on_triton(device, assert_close):
    """``extend_delegate`` (FlashInfer's prefill in the engine) gets the extend steps, over the
    pool's own pages with this step's K/V stored; decode steps never reach it."""
    heads, kv_heads, head_dim, ps = 4, 2, 16, 4
    cached, new = [9, 0, 5], [6, 3, 1]
    lens = [c + n + 1 for c, n in zip(cached, new)]
    need = [-(-n // ps) for n in lens]
    pool = KVPool(num_layers=2, num_pages=sum(need) + 1, page_size=ps, num_kv_heads=kv_heads,
                  head_dim=head_dim, dtype=torch.float32, device=device)  # fmt: skip
    pool.k(1).normal_()
    pool.v(1).normal_()
    perm = (torch.randperm(sum(need)) + 1).tolist()
    tables = [perm[sum(need[:i]) : sum(need[: i + 1])] for i in range(3)]
    scale = head_dim**-0.5
    delegate = _ReferenceDelegate(scale)
    backend = TritonAttentionBackend(
        heads, kv_heads, head_dim, scale, device=device, max_batch_size=4, max_kv_splits=2,
        min_split_len=16, num_sms=4 if device == "cpu" else None, max_context_len=64,
        extend_delegate=delegate,
    )  # fmt: skip
    ref = TorchReferenceBackend(heads, kv_heads, head_dim, scale)
    extend = build_forward_batch(new_token_ids=[[1] * n for n in new], prefix_lens=cached,
                                 page_tables=tables, page_size=ps, device=device)  # fmt: skip
    decode = build_forward_batch(new_token_ids=[[1]] * 3,
                                 prefix_lens=[c + n for c, n in zip(cached, new)],
                                 page_tables=tables, page_size=ps, device=device)  # fmt: skip
    for batch in (extend, decode):
        q, k, v = _step(batch, heads, kv_heads, head_dim, torch.float32, device)
        backend.prepare(batch)
        out = backend.forward(1, q, k, v, pool, batch)
        assert_close(out, ref.forward(1, q, k, v, pool, batch))
    assert delegate.prepared == [extend], "only the extend step is the delegate's"
    (k_pages, v_pages), = delegate.attended
    assert k_pages.shape == pool.k(1).shape == (sum(need) + 2, ps, kv_heads, head_dim)
    assert k_pages.data_ptr() == pool.k(1).data_ptr() and v_pages.data_ptr() == pool.v(1).data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                    reason="flashinfer is not installed")
def test_flashinfer_prefill_in_the_triton_backend_matches_the_reference(device, assert_close):
    """``prefill_attention='flashinfer'``: a mixed prefill/decode step over cached prefixes."""
    from radixrt.engine.runner import make_attention_backend

    heads, kv_heads, head_dim, ps, dtype = 32, 8, 128, 16, torch.bfloat16
    cached, new = [0, 700, 1500, 33], [600, 1, 200, 1]
    need = [-(-(c + n) // ps) for c, n in zip(cached, new)]
    pool = KVPool(num_layers=1, num_pages=sum(need) + 1, page_size=ps, num_kv_heads=kv_heads,
                  head_dim=head_dim, dtype=dtype, device=device)  # fmt: skip
    pool.k(0).normal_()
    pool.v(0).normal_()
    perm = (torch.randperm(sum(need)) + 1).tolist()
    tables = [perm[sum(need[:i]) : sum(need[: i + 1])] for i in range(len(need))]
    backend = make_attention_backend("triton", torch.device(device), num_heads=heads,
                                     num_kv_heads=kv_heads, head_dim=head_dim, max_batch=8,
                                     dtype=dtype, max_context_len=4096, prefill="flashinfer")
    assert backend.extend_delegate is not None  # type: ignore[attr-defined]
    batch = build_forward_batch(new_token_ids=[[1] * n for n in new], prefix_lens=cached,
                                page_tables=tables, page_size=ps, device=device)  # fmt: skip
    q, k, v = _step(batch, heads, kv_heads, head_dim, dtype, device)
    backend.prepare(batch)
    out = backend.forward(0, q, k, v, pool, batch, out=torch.full_like(q, float("nan")))
    ref = TorchReferenceBackend(heads, kv_heads, head_dim, head_dim**-0.5)
    assert_close(out, ref.forward(0, q, k, v, pool, batch))
