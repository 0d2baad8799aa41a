"""Extend attention with the new tokens' K/V read from the forward's dense tensors
(extend_newkv.py) vs the torch reference: TMA descriptors and pointer loads, splits, GQA."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from radixrt.attention.torch_ref import paged_attention_reference  # noqa: E402
from radixrt.kernels import extend_configs  # noqa: E402
from radixrt.kernels.extend_attention import extend_attention  # noqa: E402
from radixrt.kernels.extend_configs import ExtendConfig  # noqa: E402
from radixrt.kernels.extend_dense import new_token_slots  # noqa: E402
from radixrt.kernels.extend_newkv import _exp2_fma, new_kv_usable  # noqa: E402

TINY_RAGGED = ([0, 70, 5, 33, 0], [9, 20, 1, 3, 37])
REAL_RAGGED = ([0, 2000, 4095, 130, 0], [1024, 300, 1, 77, 515])


def _new_kv(case, fused: bool):
    """The new tokens' K/V as the forward holds them: contiguous, or strided views into one
    fused [T, Hq + 2 Hkv, D] projection output (as a qkv split leaves them)."""
    b = case.batch
    slots = new_token_slots(b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows, b.page_size,
                            b.num_tokens)
    k, v = case.k_flat[slots], case.v_flat[slots]
    if not fused:
        return k, v
    hq, hkv = case.q.shape[1], k.shape[1]
    qkv = torch.zeros(b.num_tokens, hq + 2 * hkv, k.shape[2], dtype=k.dtype, device=k.device)
    qkv[:, hq : hq + hkv], qkv[:, hq + hkv :] = k, v
    return qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]


def _check(paged_case, assert_close, device, ragged, heads, page_size, dtype, config, splits,
           fused=False, poison_pool=True):  # fmt: skip
    num_heads, kv_heads, head_dim = heads
    case = paged_case(
        prefix_lens=ragged[0], extend_lens=ragged[1], num_heads=num_heads, num_kv_heads=kv_heads,
        head_dim=head_dim, page_size=page_size, dtype=dtype, device=device,
    )  # fmt: skip
    b, scale = case.batch, head_dim**-0.5
    ref = paged_attention_reference(case.q, case.k_flat, case.v_flat, b, scale)
    k_new, v_new = _new_kv(case, fused)
    assert new_kv_usable(k_new, v_new, case.k_flat, b.num_tokens)
    if poison_pool:  # the new tokens' pool copies must not be read: only k_new / v_new
        slots = new_token_slots(b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows,
                                b.page_size, b.num_tokens)
        case.k_flat[slots] = float("nan")
        case.v_flat[slots] = float("nan")
    out = torch.full_like(case.q, float("nan"))
    got = extend_attention(
        case.q, case.k_flat, case.v_flat, b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows,
        b.page_size, b.max_extend_len, scale, out=out, config=config, num_kv_splits=splits,
        k_new=k_new, v_new=v_new,
    )  # fmt: skip
    assert got is out
    assert_close(out, ref)


# (heads, kv_heads, head_dim), page size, config, forced splits.
TINY_CASES = [
    ((4, 4, 16), 16, ExtendConfig(16, 16, 1, 4, 1), 1),  # GQA 1, TMA
    ((8, 2, 32), 16, ExtendConfig(16, 16, 4, 4, 1), 1),  # GQA 4 packed, 4 positions a tile
    ((8, 2, 32), 4, ExtendConfig(32, 16, 2, 4, 1, True, False), 3),  # pointer loads, split
    ((8, 1, 32), 16, ExtendConfig(16, 32, 8, 4, 1), 2),  # GQA 8, diagonal tiles < BLOCK_N
    ((4, 2, 24), 16, ExtendConfig(16, 16, 2, 4, 1), 1),  # head_dim 24: padded, pointer loads
    ((8, 2, 32), 16, ExtendConfig(16, 16, 4, 4, 1, exp_fma=True), 2),  # half the exp2 on FMAs
]


@pytest.mark.parametrize(("heads", "page_size", "config", "splits"), TINY_CASES)
def test_newkv_matches_reference(paged_case, assert_close, device, heads, page_size, config,
                                 splits):
    if device == "cuda":
        pytest.skip("tiny interpreter shapes; the gpu tests below cover real ones")
    _check(paged_case, assert_close, device, TINY_RAGGED, heads, page_size, torch.float32,
           config, splits)


@pytest.mark.parametrize("tma", [True, False])
def test_newkv_strided_views(paged_case, assert_close, device, tma):
    """k_new / v_new as strided views of a fused projection output (rows not contiguous)."""
    if device == "cuda":
        pytest.skip("tiny interpreter shapes")
    cfg = ExtendConfig(16, 16, 2, 4, 1, True, tma)
    _check(paged_case, assert_close, device, TINY_RAGGED, (8, 2, 32), 16, torch.float32, cfg, 1,
           fused=True)


@triton.jit
def _exp2_fma_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _exp2_fma(tl.load(X + offs)))


def test_exp2_fma_accuracy(device):
    """The FMA-pipe exp2 (half of each unmasked tile with exp_fma) against torch.exp2 over the
    range softmax feeds it (x <= 0), -inf (a masked key) to a negligible value."""
    if device == "cuda":
        pytest.skip("interpreter check; the gpu tests run the kernel with exp_fma")
    x = torch.cat([torch.linspace(-120, 0, 1018),
                   torch.tensor([-1e-7, -0.5, -1.0, -125.5, -126.0, float("-inf")])])
    y = torch.empty_like(x)
    _exp2_fma_kernel[(1,)](x, y, N=1024)
    ref = torch.exp2(x)
    finite = x > -126
    assert ((y - ref).abs() / ref)[finite].max() < 1e-5
    assert 0 <= y[-1] < 1e-37


def test_newkv_off_reads_the_pool(paged_case, assert_close, device, monkeypatch):
    """USE_NEW_KV off: k_new / v_new are ignored and the pool is read (a poisoned new-token
    copy there would show)."""
    monkeypatch.setattr(extend_configs, "USE_NEW_KV", False)
    case = paged_case(
        prefix_lens=[3, 0], extend_lens=[5, 6], num_heads=4, num_kv_heads=2, head_dim=16,
        page_size=4, dtype=torch.float32, device=device,
    )  # fmt: skip
    b, scale = case.batch, 0.25
    k_new, v_new = _new_kv(case, False)
    out = extend_attention(
        case.q, case.k_flat, case.v_flat, b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows,
        b.page_size, b.max_extend_len, scale, k_new=torch.full_like(k_new, float("nan")),
        v_new=v_new,
    )  # fmt: skip
    assert_close(out, paged_attention_reference(case.q, case.k_flat, case.v_flat, b, scale))


def test_new_kv_usable_rejects_mismatches(paged_case, device):
    case = paged_case(
        prefix_lens=[0], extend_lens=[6], num_heads=4, num_kv_heads=2, head_dim=16,
        page_size=4, dtype=torch.float32, device=device,
    )  # fmt: skip
    k_new, v_new = _new_kv(case, False)
    t = case.batch.num_tokens
    assert new_kv_usable(k_new, v_new, case.k_flat, t)
    assert not new_kv_usable(None, v_new, case.k_flat, t)
    assert not new_kv_usable(k_new[:-1], v_new[:-1], case.k_flat, t)  # a row per new token
    assert not new_kv_usable(k_new.half(), v_new.half(), case.k_flat, t)  # pool dtype differs


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("heads", "dtype", "config", "splits", "fused"),
    [
        ((32, 8, 128), torch.bfloat16, None, 1, False),  # the default tiles, TMA
        ((32, 8, 128), torch.bfloat16, ExtendConfig(128, 64, 4, 8, 3), 4, True),
        ((32, 8, 128), torch.bfloat16, ExtendConfig(128, 64, 4, 4, 3, True, False), 1, False),
        ((32, 8, 128), torch.float16, ExtendConfig(64, 128, 4, 4, 2), 2, True),
        ((32, 8, 64), torch.bfloat16, ExtendConfig(128, 64, 4, 8, 4), 1, False),
        ((32, 4, 64), torch.bfloat16, ExtendConfig(128, 32, 8, 4, 3), 1, False),  # GQA 8
        ((32, 8, 96), torch.bfloat16, None, 1, False),  # padded head_dim: pointer loads
        ((32, 8, 128), torch.float32, None, 1, False),  # fp32 (ieee dots)
        ((32, 8, 128), torch.bfloat16, ExtendConfig(64, 64, 4, 4, 3, exp_fma=True), 1, False),
    ],
)
def test_newkv_real_shapes(paged_case, assert_close, device, heads, dtype, config, splits, fused):
    _check(paged_case, assert_close, device, REAL_RAGGED, heads, 16, dtype, config, splits,
           fused=fused)


@pytest.mark.gpu
def test_newkv_tma_launches_on_hopper(paged_case, assert_close, device):
    """On sm_90+ the TMA descriptors compile and launch (no silent fallback to pointer loads)."""
    from radixrt.kernels import extend_newkv

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need Hopper or newer")
    _check(paged_case, assert_close, device, REAL_RAGGED, (32, 8, 128), 16, torch.bfloat16,
           ExtendConfig(128, 64, 4, 4, 3), 1)
    assert extend_newkv._TMA_FAILED is None, extend_newkv._TMA_FAILED


def _pages_in_runs(case, order):
    """Moves every request's pages onto one run of consecutive ids ("asc" as a fresh allocator
    hands them out, "desc" as the LIFO free list does after a flush; "mixed": request 1 keeps a
    broken run: its first prefix tile), copying the K/V rows along; returns each request's
    expected count of run tiles among its whole 16-key prefix tiles."""
    b, ps = case.batch, case.batch.page_size
    k_old, v_old, table_old = case.k_flat.clone(), case.v_flat.clone(), b.page_table.clone()
    next_page, want = 1, []
    for i, seq in enumerate(b.seq_lens_cpu):
        row, n = b.req_rows_cpu[i], -(-seq // ps)
        pages = list(range(next_page, next_page + n))
        next_page += n
        if order == "desc" or (order == "mixed" and i % 2 == 0):
            pages.reverse()
        broken = order == "mixed" and i == 1 and n >= 2
        if broken:
            pages[0], pages[-1] = pages[-1], pages[0]
        for j, p in enumerate(pages):
            old = int(table_old[row, j])
            case.k_flat[p * ps : (p + 1) * ps] = k_old[old * ps : (old + 1) * ps]
            case.v_flat[p * ps : (p + 1) * ps] = v_old[old * ps : (old + 1) * ps]
        b.page_table[row, :n] = torch.tensor(pages, dtype=b.page_table.dtype)
        tiles = b.prefix_lens_cpu[i] // 16
        want.append(tiles - 1 if broken and tiles else tiles)
    return want


@pytest.mark.parametrize("order", ["asc", "desc", "mixed"])
def test_newkv_prefix_on_page_runs(paged_case, assert_close, device, order):
    """Prefixes on runs of consecutive pages: whole prefix tiles load as one box of pool rows
    (rows of a descending run in reverse key order), the rest is gathered; same results."""
    if device == "cuda":
        pytest.skip("tiny interpreter shapes; the gpu test below covers real ones")
    from radixrt.kernels.extend_runs import prefix_tile_lists

    case = paged_case(
        prefix_lens=[0, 70, 5, 33], extend_lens=[9, 20, 1, 3], num_heads=8, num_kv_heads=2,
        head_dim=32, page_size=4, dtype=torch.float32, device=device,
    )  # fmt: skip
    want = _pages_in_runs(case, order)
    b = case.batch
    tiles, rows, run_tiles = prefix_tile_lists(b.page_table, b.req_rows, b.prefix_lens, 4, 16)
    assert run_tiles.tolist() == want
    for i, n_run in enumerate(want):  # every tile once; run tiles with their first pool row
        n = b.prefix_lens_cpu[i] // 16
        assert sorted(tiles[i, :n].tolist()) == list(range(n))
        pages = b.page_table[b.req_rows_cpu[i]].long()
        for j in range(n_run):
            t = int(tiles[i, j])
            assert int(rows[i, j]) == int(pages[t * 4 : t * 4 + 4].min()) * 4
    for pool_tma, splits in ((True, 1), (True, 3), (False, 1)):
        cfg = ExtendConfig(16, 16, 4, 4, 1, pool_tma=pool_tma)
        k_new, v_new = _new_kv(case, False)
        out = extend_attention(
            case.q, case.k_flat, case.v_flat, b.qo_indptr, b.prefix_lens, b.page_table,
            b.req_rows, 4, b.max_extend_len, 32**-0.5, config=cfg, k_new=k_new, v_new=v_new,
            num_kv_splits=splits,
        )  # fmt: skip
        assert_close(out, paged_attention_reference(case.q, case.k_flat, case.v_flat, b,
                                                    32**-0.5))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["desc", "mixed"])
def test_newkv_prefix_on_page_runs_real(paged_case, assert_close, device, order):
    case = paged_case(
        prefix_lens=REAL_RAGGED[0], extend_lens=REAL_RAGGED[1], num_heads=32, num_kv_heads=8,
        head_dim=128, page_size=16, dtype=torch.bfloat16, device=device,
    )  # fmt: skip
    _pages_in_runs(case, order)
    b = case.batch
    k_new, v_new = _new_kv(case, False)
    out = extend_attention(
        case.q, case.k_flat, case.v_flat, b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows,
        16, b.max_extend_len, 128**-0.5, config=ExtendConfig(64, 64, 4, 4, 3), k_new=k_new,
        v_new=v_new,
    )  # fmt: skip
    assert_close(out, paged_attention_reference(case.q, case.k_flat, case.v_flat, b, 128**-0.5))


def test_step_reuse_shares_tile_lists_across_layers_not_batches(paged_case, assert_close,
                                                                device, monkeypatch):
    """ExtendReuse (one per attention backend): a step's layers share one prefix tile list and
    each pool layer's descriptor; another batch, even without new_step, gets its own lists.
    Every layer's output still equals the reference."""
    if device == "cuda":
        pytest.skip("tiny interpreter shapes")
    from radixrt.kernels import extend_runs

    calls = {"n": 0}
    real = extend_runs.prefix_tile_lists

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(extend_runs, "prefix_tile_lists", counting)
    reuse = extend_runs.ExtendReuse()
    cfg = ExtendConfig(16, 16, 4, 4, 1, pool_tma=True)
    for batch_no, ragged in enumerate((([0, 70, 5, 33], [9, 20, 1, 3]), ([40, 0], [7, 12]))):
        case = paged_case(
            prefix_lens=ragged[0], extend_lens=ragged[1], num_heads=8, num_kv_heads=2,
            head_dim=32, page_size=4, dtype=torch.float32, device=device,
        )  # fmt: skip
        _pages_in_runs(case, "asc")
        b = case.batch
        layers = [(case.k_flat, case.v_flat), (case.k_flat * 0.5, case.v_flat.flip(-1).clone())]
        for k_flat, v_flat in layers:
            case.k_flat, case.v_flat = k_flat, v_flat
            k_new, v_new = _new_kv(case, False)
            out = extend_attention(
                case.q, k_flat, v_flat, b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows, 4,
                b.max_extend_len, 32**-0.5, config=cfg, k_new=k_new, v_new=v_new, reuse=reuse,
            )  # fmt: skip
            assert_close(out, paged_attention_reference(case.q, k_flat, v_flat, b, 32**-0.5))
        assert calls["n"] == batch_no + 1, "one tile list per batch, shared by its layers"
        assert reuse.pool_descriptor(layers[0][0], 16) is reuse.pool_descriptor(layers[0][0], 16)
    reuse.new_step()
    assert not reuse._tiles, "new_step drops the step's lists"
