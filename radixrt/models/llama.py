"""Llama-family decoder (Llama 2, Llama 3/3.1, Mistral, SmolLM2): the base the Qwen models extend.

Per layer (pre-norm; the residual add is fused into the next norm)::

    h ──norm──▶ qkv_proj ─▶ q,k,v ─▶ rope(q,k) ─▶ attn ─▶ o_proj ──(+h)──norm──▶ gate_up ─▶ silu*up
        ─▶ down_proj ──(+residual)──▶ next layer

Checkpoints use HF names; ``load_weights`` packs q/k/v into ``qkv_proj`` and gate/up into
``gate_up_proj``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from radixrt.models.args import ModelArgs
from radixrt.models.layers import (
    AttnFn,
    Device,
    GatedMLP,
    GemmFn,
    Linear,
    LMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabEmbedding,
    lm_logits,
)
from radixrt.models.shard import ShardPlan, take_shard

if TYPE_CHECKING:
    from radixrt.distributed.group import TPGroup


class LlamaAttention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, *, dtype: torch.dtype, device: Device,
                 tp: TPGroup | None = None):
        super().__init__()
        plan = ShardPlan.of(args, tp)
        self.layer_id = layer_id
        # This rank's heads (all of them without TP): q heads split evenly, KV heads split or,
        # when there are fewer than ranks, replicated (each rank keeps the one its q heads use).
        self.num_heads = plan.num_heads
        self.num_kv_heads = plan.num_kv_heads
        self.head_dim = args.head_dim
        self.q_size = plan.num_heads * args.head_dim
        self.kv_size = plan.num_kv_heads * args.head_dim
        # Fused [q; k; v] rows: [0, q_size) | [q_size, q_size + kv_size) | [.., + kv_size).
        self.qkv_proj = Linear(
            args.hidden_size,
            self.q_size + 2 * self.kv_size,
            bias=args.attention_bias,
            dtype=dtype,
            device=device,
        )
        self.o_proj = RowParallelLinear(self.q_size, args.hidden_size, bias=False, dtype=dtype,
                                        device=device, tp=tp)

    def qk_transform(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook applied to q[T,Hq,D], k[T,Hkv,D] before RoPE (Qwen3 normalizes here)."""
        return q, k

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        hidden: torch.Tensor,  # [T, H]
        attn: AttnFn,
        rotary: RotaryEmbedding,
    ) -> torch.Tensor:  # [T, H]
        t = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Strided views into qkv (no copy); consumers must accept non-contiguous q/k/v.
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = self.qk_transform(q, k)
        q, k = rotary(positions, q, k)
        out = attn(self.layer_id, q, k, v)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        layer_id: int,
        attention_cls: type[LlamaAttention],
        *,
        dtype: torch.dtype,
        device: Device,
        tp: TPGroup | None = None,
    ):
        super().__init__()
        self.self_attn = attention_cls(args, layer_id, dtype=dtype, device=device, tp=tp)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, dtype=dtype, device=device,
                            tp=tp)
        eps = args.rms_norm_eps
        self.input_layernorm = RMSNorm(args.hidden_size, eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps, dtype=dtype, device=device)

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        hidden: torch.Tensor,  # [T, H]
        residual: torch.Tensor | None,  # [T, H]; None before the first layer
        attn: AttnFn,
        rotary: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.forward_add(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn, rotary)
        hidden, residual = self.post_attention_layernorm.forward_add(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        attention_cls: type[LlamaAttention],
        *,
        dtype: torch.dtype,
        device: Device,
        tp: TPGroup | None = None,
    ):
        super().__init__()
        self.embed_tokens = VocabEmbedding(
            args.vocab_size, args.hidden_size, dtype=dtype, device=device, tp=tp
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(args, i, attention_cls, dtype=dtype, device=device, tp=tp)
            for i in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype=dtype, device=device)
        self.rotary_emb = RotaryEmbedding(
            args.head_dim,
            args.max_position_embeddings,
            args.rope_theta,
            args.rope_scaling,
            device=device,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttnFn
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, H]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, attn, self.rotary_emb)
        assert residual is not None, "a model needs at least one layer"
        hidden, _ = self.norm.forward_add(hidden, residual)
        return hidden


# HF projection name -> (our fused param, shard index within it).
_PACKED: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    attention_cls: ClassVar[type[LlamaAttention]] = LlamaAttention

    def __init__(
        self, args: ModelArgs, *, dtype: torch.dtype = torch.float32, device: Device = "cpu",
        tp: TPGroup | None = None,
    ):
        super().__init__()
        self.args = args
        self.tp = tp
        self.shard_plan = ShardPlan.of(args, tp)
        self.model = LlamaModel(args, self.attention_cls, dtype=dtype, device=device, tp=tp)
        self.lm_head = (
            None
            if args.tie_word_embeddings
            else LMHead(args.vocab_size, args.hidden_size, dtype=dtype, device=device, tp=tp)
        )
        self.logits_gemm: GemmFn = F.linear

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        attn: AttnFn,
    ) -> torch.Tensor:  # [T, hidden]
        return self.model(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] fp32
        weight = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight
        return lm_logits(hidden, weight, self.logits_gemm, self.tp, self.args.vocab_size)

    # ----------------------------------------------------------------------- weights

    def _shard_sizes(self, fused: str) -> list[int]:
        p = self.shard_plan
        if fused == "qkv_proj":
            return [p.q_size, p.kv_size, p.kv_size]
        return [p.intermediate, p.intermediate]

    def checkpoint_names(self) -> set[str]:
        """HF parameter names a complete checkpoint of this model provides."""
        names: set[str] = set()
        for name, _ in self.named_parameters():
            fused = next((f for f in ("qkv_proj", "gate_up_proj") if f".{f}." in name), None)
            if fused is None:
                names.add(name)
                continue
            for hf, (target, _) in _PACKED.items():
                if target == fused:
                    names.add(name.replace(f".{fused}.", f".{hf}."))
        return names

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Copy HF-named tensors into the (fused) parameters, converting dtype and device.

        A weight is a tensor or a lazy safetensors slice; under TP only this rank's part of it is
        read (``ShardPlan.rule``), so a rank never materializes another rank's shard."""
        params = dict(self.named_parameters())
        expected = self.checkpoint_names()
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # derived buffer some old checkpoints carry
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue  # tied: the embedding is the head
            if name not in expected:
                raise ValueError(f"unexpected weight {name!r} for {self.args.architecture}")
            proj = name.split(".")[-2]
            if proj in _PACKED:
                fused, shard = _PACKED[proj]
                param = params[name.replace(f".{proj}.", f".{fused}.")]
                sizes = self._shard_sizes(fused)
                dst = param.data.narrow(0, sum(sizes[:shard]), sizes[shard])
            else:
                dst = params[name].data
            tensor = take_shard(tensor, self.shard_plan.rule(name))
            if self.shard_plan.is_vocab(name) and tensor.shape[0] < dst.shape[0]:
                dst[tensor.shape[0]:].zero_()  # padding rows of the last vocab slice
                dst = dst[: tensor.shape[0]]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}"
                )
            with torch.no_grad():
                dst.copy_(tensor)
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (
                f", ... ({len(missing)} in all)" if len(missing) > 8 else ""
            )
            raise ValueError(f"checkpoint is missing weights: {shown}")
