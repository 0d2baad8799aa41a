"""Kernel tests run twice over: tiny shapes on the CPU under Triton's interpreter, and real shapes
(marked ``gpu``) compiled on CUDA. Without CUDA the interpreter is switched on here, before any
test module imports triton."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from radixrt.engine.batch import ForwardBatch, build_forward_batch  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere (an unwritten output) fails any bound."""
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm())


TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test taking ``device`` runs as ``cpu`` (interpreter, tiny shapes) and ``cuda``
    (compiled, real shapes, marked gpu)."""
    if "device" not in metafunc.fixturenames:
        return
    gpu_only = metafunc.definition.get_closest_marker("gpu") is not None
    params = [
        pytest.param(
            "cpu",
            marks=pytest.mark.skipif(not INTERPRETING, reason="CPU runs need TRITON_INTERPRET=1"),
        ),
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    not torch.cuda.is_available() or INTERPRETING,
                    reason="needs CUDA with compiled (not interpreted) Triton",
                ),
            ],
        ),
    ]
    metafunc.parametrize("device", params[1:] if gpu_only else params)


@dataclass
class PagedCase:
    batch: ForwardBatch
    k_flat: torch.Tensor  # [S, Hkv, D] random pool layer, holding the step's K already
    v_flat: torch.Tensor
    q: torch.Tensor  # [T, Hq, D]


def make_paged_case(
    *,
    prefix_lens: list[int],
    extend_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: str,
    spare_pages: int = 3,
) -> PagedCase:
    """A ragged batch whose requests own randomly permuted (non-contiguous) pages of a random
    pool; page 0 stays scratch as in the real pool."""
    pages_needed = [-(-(p + e) // page_size) for p, e in zip(prefix_lens, extend_lens)]
    num_pages = sum(pages_needed) + spare_pages
    perm = (torch.randperm(num_pages) + 1).tolist()
    tables, used = [], 0
    for n in pages_needed:
        tables.append(perm[used : used + n])
        used += n
    batch = build_forward_batch(
        new_token_ids=[[1] * e for e in extend_lens],
        prefix_lens=prefix_lens,
        page_tables=tables,
        page_size=page_size,
        device=device,
    )
    slots = (num_pages + 1) * page_size
    shape = (slots, num_kv_heads, head_dim)
    k_flat = torch.randn(shape, dtype=dtype, device=device)
    v_flat = torch.randn(shape, dtype=dtype, device=device)
    q = torch.randn(batch.num_tokens, num_heads, head_dim, dtype=dtype, device=device)
    return PagedCase(batch=batch, k_flat=k_flat, v_flat=v_flat, q=q)


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """Fresh random inputs every run; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    return seed


@pytest.fixture
def paged_case() -> Callable[..., PagedCase]:
    return make_paged_case


@pytest.fixture
def assert_close() -> Callable[[torch.Tensor, torch.Tensor], float]:
    """Checks relative error against the dtype's bound (fp32 1e-4, fp16 1e-2, bf16 2e-2)."""

    def check(out: torch.Tensor, ref: torch.Tensor) -> float:
        assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
        assert not out.isnan().any(), "output has NaN (unwritten or overflowed elements)"
        err = rel_err(out, ref)
        bound = TOL[ref.dtype]
        assert err < bound, f"relative error {err:.3e} >= {bound:.0e} ({ref.dtype})"
        return err

    return check
