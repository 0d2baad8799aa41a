"""Extend (prefill) attention over the paged pool vs the torch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from radixrt.attention.torch_ref import gather_slots, paged_attention_reference  # noqa: E402
from radixrt.kernels import extend_dense  # noqa: E402
from radixrt.kernels.extend_attention import extend_attention  # noqa: E402
from radixrt.kernels.extend_configs import (  # noqa: E402
    MAX_SPLITS,
    MIN_SPLIT_KEYS,
    ExtendConfig,
    choose_kv_splits,
    default_config,
    packable_heads,
    sm_count,
)

# (prefix_lens, extend_lens): prefixes of 0 and > 0, a single-token extend (a decode inside a
# mixed batch), extends spanning several query blocks, prefixes not aligned to any block.
TINY_RAGGED = ([0, 19, 5, 40], [7, 20, 1, 3])
REAL_RAGGED = ([0, 2000, 4095, 130, 0], [1024, 300, 1, 77, 515])


def _run(paged_case, assert_close, device, ragged, heads, kv_heads, head_dim, page_size, dtype):
    prefix_lens, extend_lens = ragged
    case = paged_case(
        prefix_lens=prefix_lens,
        extend_lens=extend_lens,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        device=device,
    )
    b, scale = case.batch, head_dim**-0.5
    out = torch.full_like(case.q, float("nan"))
    got = extend_attention(
        case.q, case.k_flat, case.v_flat, b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows,
        b.page_size, b.max_extend_len, scale, out=out,
    )  # fmt: skip
    assert got is out, "the kernel must write into the given output"
    ref = paged_attention_reference(case.q, case.k_flat, case.v_flat, b, scale)
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 16), (8, 2, 64)])
def test_extend_matches_reference(
    paged_case, assert_close, device, heads, kv_heads, head_dim, page_size, dtype
):
    ragged = TINY_RAGGED
    if device == "cuda":
        heads, kv_heads, ragged = heads * 4, kv_heads * 4, REAL_RAGGED
    _run(paged_case, assert_close, device, ragged, heads, kv_heads, head_dim, page_size, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("head_dim", "page_size", "dtype"),
    [
        (128, 1, torch.bfloat16),
        (128, 16, torch.bfloat16),
        (128, 64, torch.float16),
        (128, 16, torch.float32),
        (96, 16, torch.bfloat16),
        (64, 1, torch.float16),
        (32, 16, torch.bfloat16),
    ],
)
def test_extend_real_shapes(paged_case, assert_close, device, head_dim, page_size, dtype):
    """8B-like shapes (32 query heads over 8 KV heads); head_dim 96 exercises the padded block."""
    _run(paged_case, assert_close, device, REAL_RAGGED, 32, 8, head_dim, page_size, dtype)


def test_extend_reads_through_page_table(paged_case, device):
    """Overwriting pages no request owns (scratch page 0, spare pages) changes nothing."""
    case = paged_case(
        prefix_lens=[9, 0], extend_lens=[5, 4], num_heads=4, num_kv_heads=2, head_dim=16,
        page_size=4, dtype=torch.float32, device=device, spare_pages=4,
    )  # fmt: skip
    b = case.batch
    args = (b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows, b.page_size, b.max_extend_len,
            0.25)
    before = extend_attention(case.q, case.k_flat, case.v_flat, *args)
    owned = torch.zeros(case.k_flat.shape[0], dtype=torch.bool, device=device)
    for i, seq_len in enumerate(b.seq_lens_cpu):
        pos = torch.arange(seq_len, device=device)
        owned[b.page_table[b.req_rows_cpu[i]].long()[pos // 4] * 4 + pos % 4] = True
    case.k_flat[~owned] = 1e4
    case.v_flat[~owned] = float("nan")
    after = extend_attention(case.q, case.k_flat, case.v_flat, *args)
    assert torch.equal(before, after), "attention read KV outside the requests' pages"


# GQA packing, page-table reads and split-KV: each case names (heads, kv_heads, head_dim),
# page size, the tile config (None = the default) and the forced split count.
CONFIG_CASES = [
    ((4, 4, 64), 16, ExtendConfig(16, 16, 1, 4, 1), 1),  # GQA 1
    ((8, 2, 128), 16, ExtendConfig(16, 16, 4, 4, 1), 1),  # GQA 4 packed, one table read a page
    ((8, 2, 128), 1, ExtendConfig(32, 16, 2, 4, 1), 3),  # half the group a tile, split
    ((8, 1, 64), 16, ExtendConfig(16, 32, 8, 4, 1, False), 1),  # GQA 8, per-key table reads
    ((8, 1, 64), 1, ExtendConfig(16, 16, 8, 4, 1), 4),  # GQA 8 packed, split
    ((8, 2, 64), 16, ExtendConfig(16, 16, 4, 4, 1), 2),  # a page per tile, split
    ((4, 4, 16), 32, ExtendConfig(32, 16, 1, 4, 1), 5),  # a tile inside one page, split
]


@pytest.mark.parametrize(("heads", "page_size", "config", "splits"), CONFIG_CASES)
def test_extend_configs_and_splits(paged_case, assert_close, device, heads, page_size, config,
                                   splits):
    """Every packing / table-read / split path against the reference on ragged requests with
    and without a prefix (prefixes long enough that splits get several tiles, or none)."""
    if device == "cuda":
        pytest.skip("tiny interpreter shapes; the gpu tests below cover real ones")
    num_heads, kv_heads, head_dim = heads
    case = paged_case(
        prefix_lens=[0, 70, 5, 33], extend_lens=[9, 20, 1, 3], num_heads=num_heads,
        num_kv_heads=kv_heads, head_dim=head_dim, page_size=page_size, dtype=torch.float32,
        device=device,
    )  # fmt: skip
    b, scale = case.batch, head_dim**-0.5
    out = torch.full_like(case.q, float("nan"))
    extend_attention(
        case.q, case.k_flat, case.v_flat, b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows,
        b.page_size, b.max_extend_len, scale, out=out, config=config, num_kv_splits=splits,
    )  # fmt: skip
    assert_close(out, paged_attention_reference(case.q, case.k_flat, case.v_flat, b, scale))


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("heads", "head_dim", "config", "splits"),
    [
        ((32, 8), 128, None, 4),  # the default tiles, split
        ((32, 8), 128, ExtendConfig(128, 128, 4, 8, 3), 1),
        ((32, 8), 128, ExtendConfig(64, 64, 1, 4, 4), 1),
        ((32, 4), 64, None, 1),  # GQA 8
        ((32, 4), 64, ExtendConfig(128, 64, 8, 4, 3, False), 3),
    ],
)
def test_extend_configs_real_shapes(paged_case, assert_close, device, heads, head_dim, config,
                                    splits):
    case = paged_case(
        prefix_lens=REAL_RAGGED[0], extend_lens=REAL_RAGGED[1], num_heads=heads[0],
        num_kv_heads=heads[1], head_dim=head_dim, page_size=16, dtype=torch.bfloat16,
        device=device,
    )  # fmt: skip
    b, scale = case.batch, head_dim**-0.5
    out = torch.full_like(case.q, float("nan"))
    extend_attention(
        case.q, case.k_flat, case.v_flat, b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows,
        b.page_size, b.max_extend_len, scale, out=out, config=config, num_kv_splits=splits,
    )  # fmt: skip
    assert_close(out, paged_attention_reference(case.q, case.k_flat, case.v_flat, b, scale))


@pytest.mark.gpu
def test_extend_auto_split_one_long_request(paged_case, assert_close, device):
    """One request of 512 new tokens after a 16k prefix: too few tiles to fill the GPU, so the
    kernel splits the prefix (max_seq_len known) and still matches the reference."""
    case = paged_case(
        prefix_lens=[16384], extend_lens=[512], num_heads=32, num_kv_heads=8, head_dim=128,
        page_size=16, dtype=torch.bfloat16, device=device,
    )  # fmt: skip
    b, scale = case.batch, 128**-0.5
    kw = dict(max_seq_len=16384 + 512)
    assert choose_kv_splits(16 * 8, 16384 + 512, 512, 32, 128, sm_count(torch.device(device))) > 1
    out = torch.full_like(case.q, float("nan"))
    extend_attention(case.q, case.k_flat, case.v_flat, b.qo_indptr, b.prefix_lens, b.page_table,
                     b.req_rows, b.page_size, b.max_extend_len, scale, out=out, **kw)
    assert_close(out, paged_attention_reference(case.q, case.k_flat, case.v_flat, b, scale))


def test_choose_kv_splits_policy():
    # Enough tiles to fill 132 SMs twice over: no split, whatever the length.
    assert choose_kv_splits(264, 120_000, 8192, 32, 128, 132) == 1
    # Unknown length (the caller passed no max_seq_len): no split.
    assert choose_kv_splits(8, None, 512, 32, 128, 132) == 1
    # 128 tiles over a 32k prefix: split towards 2 programs per SM (3, rounded to a power of 2).
    assert choose_kv_splits(128, 32768, 512, 32, 128, 132) == 2
    assert choose_kv_splits(64, 32768, 512, 32, 128, 132) == 4
    # Short KV: each split must keep MIN_SPLIT_KEYS keys.
    assert choose_kv_splits(8, 3 * MIN_SPLIT_KEYS, 64, 32, 128, 132) == 2
    assert choose_kv_splits(1, 10**6, 16, 32, 128, 132) == MAX_SPLITS
    # Scratch cap: 2^20 tokens x 32 heads of fp32 partials would not fit twice.
    assert choose_kv_splits(1, 10**6, 1 << 20, 32, 128, 132) == 1


def test_extend_config_validation():
    with pytest.raises(AssertionError):
        ExtendConfig(96, 64, 1, 4, 3)  # rows not a power of 2
    with pytest.raises(AssertionError):
        ExtendConfig(16, 16, 32, 4, 1)  # more packed heads than rows
    assert packable_heads(4, 8) == 4 and packable_heads(8, 4) == 4 and packable_heads(3, 8) == 1
    cfg = default_config(128, 4, torch.device("cpu"))
    assert cfg.heads_per_tile == 4 and cfg.block_m % cfg.heads_per_tile == 0


def test_long_extends_take_the_long_table_entry_on_hopper(monkeypatch):
    # A long prompt's chunks and short batched extends have different H200 winners: the
    # selection must follow the extend length, and shapes without a long entry keep TABLE's.
    from radixrt.kernels import extend_configs

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda")
    short = default_config(128, 4, cuda, 2, 1024)
    long = default_config(128, 4, cuda, 2, extend_configs.LONG_EXTEND_TOKENS)
    assert short == extend_configs.TABLE[(128, 4, 9)]
    assert long == extend_configs.LONG_TABLE[(128, 4, 9)] and long != short
    assert default_config(64, 4, cuda, 2, 32768) == extend_configs.TABLE[(64, 4, 9)]


def _math_sdpa(q, k, v, scale, causal=True):
    """A stand-in for the fused SDPA op on the CPU: attention (causal: square, query i sees keys
    <= i) and its natural-log LSE."""
    group = q.shape[1] // k.shape[1]  # the ops take GQA: fewer K/V heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1) @ v.float(), torch.logsumexp(scores, -1)


@pytest.mark.parametrize("splits", [1, 2])
def test_dense_new_path_matches_reference(paged_case, assert_close, device, monkeypatch, splits):
    """Long extends: new x new on a fused SDPA (on the CPU a math stand-in), the cached prefix
    alone in the paged kernel (no causal masks, split or not), merged by log-sum-exp."""
    ragged = ([0, 70, 5, 33], [9, 20, 1, 3]) if device == "cpu" else REAL_RAGGED
    dtype, heads = (torch.float32, (8, 2, 64)) if device == "cpu" else (torch.bfloat16, (32, 8, 128))
    if device == "cpu":
        monkeypatch.setattr(extend_dense, "sdpa_with_lse", _math_sdpa)
    case = paged_case(
        prefix_lens=ragged[0], extend_lens=ragged[1], num_heads=heads[0], num_kv_heads=heads[1],
        head_dim=heads[2], page_size=16, dtype=dtype, device=device,
    )  # fmt: skip
    b, scale = case.batch, heads[2] ** -0.5
    out = torch.full_like(case.q, float("nan"))
    extend_attention(
        case.q, case.k_flat, case.v_flat, b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows,
        b.page_size, b.max_extend_len, scale, out=out, num_kv_splits=splits, dense_new=True,
    )  # fmt: skip
    assert_close(out, paged_attention_reference(case.q, case.k_flat, case.v_flat, b, scale))


@pytest.mark.parametrize("prefix_chunk", [16, 64, 1 << 20])
def test_dense_extend_matches_reference(paged_case, assert_close, device, monkeypatch, prefix_chunk):
    """Long-extend batches entirely on the fused SDPA: the prefix gathered from its (shuffled)
    pages in chunks of ``prefix_chunk`` keys, each chunk and the causal new x new part merged by
    log-sum-exp; requests with and without a prefix, chunks not aligned to pages or lengths."""
    ragged = ([0, 70, 5, 33], [9, 20, 1, 3]) if device == "cpu" else REAL_RAGGED
    dtype, heads = (torch.float32, (8, 2, 64)) if device == "cpu" else (torch.bfloat16, (32, 8, 128))
    if device == "cpu":
        monkeypatch.setattr(extend_dense, "sdpa_with_lse", _math_sdpa)
    case = paged_case(
        prefix_lens=ragged[0], extend_lens=ragged[1], num_heads=heads[0], num_kv_heads=heads[1],
        head_dim=heads[2], page_size=16, dtype=dtype, device=device,
    )  # fmt: skip
    b, scale = case.batch, heads[2] ** -0.5
    slots = extend_dense.new_token_slots(b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows,
                                         b.page_size, b.num_tokens)
    out = torch.full_like(case.q, float("nan"))
    extend_dense.dense_extend(
        case.q, case.k_flat, case.v_flat, case.k_flat[slots], case.v_flat[slots], b.page_table,
        b.page_size, scale, b.extend_lens_cpu, b.prefix_lens_cpu, b.req_rows_cpu, out,
        prefix_chunk=prefix_chunk,
    )  # fmt: skip
    assert_close(out, paged_attention_reference(case.q, case.k_flat, case.v_flat, b, scale))


def test_new_token_slots_match_reference_gather(paged_case, device):
    case = paged_case(
        prefix_lens=[0, 70, 5], extend_lens=[9, 20, 1], num_heads=2, num_kv_heads=1,
        head_dim=16, page_size=4, dtype=torch.float32, device=device,
    )  # fmt: skip
    b = case.batch
    got = extend_dense.new_token_slots(b.qo_indptr, b.prefix_lens, b.page_table, b.req_rows, 4,
                                       b.num_tokens)
    want = torch.cat([
        gather_slots(b.page_table[b.req_rows_cpu[i]], p + e, 4)[p:]
        for i, (p, e) in enumerate(zip(b.prefix_lens_cpu, b.extend_lens_cpu))
    ])  # fmt: skip
    assert torch.equal(got, want)
