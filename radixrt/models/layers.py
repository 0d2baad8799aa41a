"""Building blocks shared by the decoder architectures, in plain torch.

Every op has a torch path written to match Hugging Face numerics (so fp32 CPU output equals
transformers), and on CUDA tensors dispatches to the Triton kernels in ``radixrt.kernels`` when
they import; a missing kernel module falls back to torch.

Parameters are created with ``torch.empty`` on the requested device/dtype and never initialized
here: the loader fills them from a checkpoint or with dummy values. Building on "meta" is free.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from radixrt.models.args import RopeScaling

if TYPE_CHECKING:
    from radixrt.distributed.group import TPGroup

# attn(layer_id, q[T,Hq,D], k[T,Hkv,D], v[T,Hkv,D]) -> [T,Hq,D]; bound by the runner to an
# AttentionBackend + KVPool + ForwardBatch, so models never see pages.
AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

Device = torch.device | str

# gemm(x[..., K], weight[N, K], bias[N] | None) -> [..., N]: F.linear, or a batch-invariant
# kernel under deterministic inference (see ``set_gemm``).
GemmFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@functools.cache
def _kernel_module(name: str) -> ModuleType | None:
    """``radixrt.kernels.<name>`` if it imports (Triton present), else None. Cached: a failed
    import is not cached by Python and would be retried (slowly) on every call."""
    try:
        return importlib.import_module(f"radixrt.kernels.{name}")
    except ImportError:
        return None


def _kernel(module: str, fn: str, x: torch.Tensor) -> Callable[..., Any] | None:
    if not x.is_cuda:
        return None
    mod = _kernel_module(module)
    return getattr(mod, fn, None) if mod is not None else None


# --------------------------------------------------------------------------- RMSNorm


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As HF: statistics in float32, cast back to the input dtype before the weight multiply.
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x[..., H] -> [..., H]."""
    kernel = _kernel("rmsnorm", "rms_norm", x)
    if kernel is not None and x.dim() == 2:
        out = kernel(x, weight, eps)
        assert isinstance(out, torch.Tensor), "rms_norm kernel must return a tensor"
        return out
    return rms_norm_torch(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x[T,H], residual[T,H]) -> (rms_norm(x + residual), x + residual)."""
    kernel = _kernel("rmsnorm", "fused_add_rms_norm", x)
    if kernel is not None:
        normed, new_residual = kernel(x, residual, weight, eps)
        return normed, new_residual
    # The sum stays in the model dtype, as HF's `residual + hidden_states`.
    new_residual = x + residual
    return rms_norm_torch(new_residual, weight, eps), new_residual


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, *, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def forward_add(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


# --------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, llama3-scaled when asked."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope_torch(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, D] float32 = cat(cos[:, :D/2], sin[:, :D/2])
) -> tuple[torch.Tensor, torch.Tensor]:
    half = cos_sin_cache.shape[1] // 2
    cos_sin = cos_sin_cache[positions]  # [T, D]
    # Rotate-half layout: dims (i, i + D/2) form a rotation pair sharing frequency i.
    cos = cos_sin[:, :half].repeat(1, 2)[:, None, :].to(q.dtype)  # [T, 1, D]
    sin = cos_sin[:, half:].repeat(1, 2)[:, None, :].to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    return rotate(q), rotate(k)


class RotaryEmbedding(nn.Module):
    cos_sin_cache: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        scaling: RopeScaling | None,
        *,
        device: Device,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        inv_freq = rope_inv_freq(head_dim, theta, scaling)  # [D/2] (CPU, exact as HF)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = t[:, None] * inv_freq[None, :]  # [max_pos, D/2]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, D]
        # Non-persistent: derived from config, never part of a checkpoint.
        self.register_buffer("cos_sin_cache", cache.to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kernel = _kernel("rope", "apply_rope", q)
        if kernel is not None:
            q_out, k_out = kernel(q, k, positions, self.cos_sin_cache)
            return q_out, k_out
        return apply_rope_torch(q, k, positions, self.cos_sin_cache)


# --------------------------------------------------------------------------- MLP


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x[T, 2I] = cat(gate, up) -> silu(gate) * up [T, I]."""
    kernel = _kernel("activation", "silu_and_mul", x)
    if kernel is not None:
        out = kernel(x)
        assert isinstance(out, torch.Tensor), "silu_and_mul kernel must return a tensor"
        return out
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


class Linear(nn.Module):
    """y = x W^T (+ b), with uninitialized storage (the loader fills it)."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype, device: Device
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device)
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        )
        self.gemm: GemmFn = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x, self.weight, self.bias)


class RowParallelLinear(Linear):
    """Input features split over the tensor-parallel ranks: each rank multiplies its slice and
    the partial outputs are summed by one all-reduce (the bias, replicated, is added after it).
    A column-parallel projection needs no class of its own: it is a ``Linear`` with this rank's
    rows, and the loader narrows the checkpoint to them."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
        device: Device, tp: TPGroup | None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is None or self.tp.size == 1:
            return self.gemm(x, self.weight, self.bias)
        out = self.tp.all_reduce(self.gemm(x, self.weight, None))
        return out + self.bias if self.bias is not None else out


class GatedMLP(nn.Module):
    def __init__(
        self, hidden: int, intermediate: int, *, dtype: torch.dtype, device: Device,
        tp: TPGroup | None = None,
    ) -> None:
        super().__init__()
        # Fused [gate; up]: rows 0..I-1 are gate_proj, rows I..2I-1 are up_proj (this rank's
        # I / tp rows of each under tensor parallelism).
        tp_size = tp.size if tp is not None else 1
        assert intermediate % tp_size == 0, f"intermediate {intermediate} not divisible by tp {tp_size}"
        local = intermediate // tp_size
        self.gate_up_proj = Linear(hidden, 2 * local, bias=False, dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(local, hidden, bias=False, dtype=dtype, device=device,
                                           tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


# --------------------------------------------------------------------------- embeddings


def vocab_shard(vocab: int, tp: TPGroup | None) -> tuple[int, int]:
    """(first row, rows per rank) of this rank's slice of a vocab-parallel table: the vocab is
    padded up to a multiple of the ranks; padding rows are zero and their logits dropped."""
    if tp is None or tp.size == 1:
        return 0, vocab
    per_rank = -(-vocab // tp.size)
    return tp.rank * per_rank, per_rank


class VocabEmbedding(nn.Module):
    """Vocab-parallel under TP: each rank looks up the ids in its slice (others give zero rows)
    and one all-reduce assembles the embedding."""

    def __init__(self, vocab: int, hidden: int, *, dtype: torch.dtype, device: Device,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_start, rows = vocab_shard(vocab, tp)
        self.weight = nn.Parameter(torch.empty(rows, hidden, dtype=dtype, device=device))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        if self.tp is None or self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local * mine, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)


class LMHead(nn.Module):
    """Untied output projection (vocab-parallel rows under TP, as the embedding). Tied models
    have no LMHead and project with the embedding's weight instead (see ``lm_logits``), so the
    weight is stored and loaded once."""

    def __init__(self, vocab: int, hidden: int, *, dtype: torch.dtype, device: Device,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        _, rows = vocab_shard(vocab, tp)
        self.weight = nn.Parameter(torch.empty(rows, hidden, dtype=dtype, device=device))


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor, gemm: GemmFn = F.linear,
              tp: TPGroup | None = None, vocab: int | None = None) -> torch.Tensor:
    """hidden[N, H] x weight[V, H] -> logits [N, V] float32 (matmul in the model dtype, as HF).
    Under TP ``weight`` is this rank's vocab slice: the slices are gathered in rank order (every
    rank gets the full logits; only rank 0 samples) and the padding columns dropped."""
    logits = gemm(hidden, weight, None)
    if tp is not None and tp.size > 1:
        assert vocab is not None, "a vocab-parallel head needs the true vocab size"
        logits = tp.all_gather_last(logits)[..., :vocab]
    return logits.float()


def set_gemm(model: nn.Module, gemm: GemmFn) -> int:
    """Route every projection of ``model`` (and its logits, via a ``logits_gemm`` attribute)
    through ``gemm``; returns how many were rerouted."""
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.gemm = gemm
            count += 1
        if hasattr(module, "logits_gemm"):
            setattr(module, "logits_gemm", gemm)  # noqa: B010 (attribute of unknown module types)
            count += 1
    return count
