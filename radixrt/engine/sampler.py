"""Batched token sampler: penalties, logprobs, temperature, top-k / top-p / min-p, draw.

Device-agnostic torch (plus a Triton kernel for top-p on CUDA, which sorts nothing). Every
branch is decided from host-side SamplingParams, never from tensor values, so a step costs no
device->host sync until the final ``.tolist()``.

Logprob convention: returned logprobs are ``log_softmax`` of the logits *after* repetition /
frequency / presence penalties and *before* temperature and top-k/top-p/min-p. They describe the
distribution the penalties define, independent of how adventurous the draw was (vLLM's default
"raw" mode skips the penalties too; we include them because a penalized token really is less
likely for this request). Prompt logprobs have no generation state, so they are raw.

Draws use the exponential-race trick: with ``q_i ~ Exp(1)`` i.i.d.,
``argmax_i p_i / q_i`` is distributed as Categorical(p). Each seeded row fills its own ``q`` row
from its own generator, so its token depends only on its seed, its step count and its logits,
never on which other requests share the batch or at which position it sits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from radixrt.engine.batch import host_to_device
from radixrt.sampling_params import SamplingParams

# q == 0 would turn p / q into inf (or nan for p == 0); the clamp moves a measure-zero event.
_MIN_EXP = 1e-20


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one seeded request, living on the device its logits live on.

    torch takes seeds in [0, 2^64); the seed is wrapped into that range (Python's ``%`` also
    maps negatives there), so no seed can raise here, inside a fork in the middle of a step."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed % 2**64)
    return gen


@dataclass(frozen=True)
class SamplerRow:
    """One request's view for one step. The id sequences are read, never copied or mutated."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # Tokens this step may not draw (EOS / stop tokens before min_new_tokens is reached).
    banned: Sequence[int] = ()


@dataclass(frozen=True)
class SampleOutput:
    token_ids: list[int]
    # Chosen token's logprob per row; None when no row asked for logprobs.
    logprobs: list[float] | None
    # Per row its own top_logprobs (sorted, most likely first; [] for rows that asked for 0);
    # None when no row asked.
    top_logprobs: list[list[tuple[int, float]]] | None


@dataclass
class PendingSample:
    """A draw still on the device: ``tokens`` can feed the next step before the host reads it."""

    tokens: torch.Tensor  # [B] int64
    top_k: list[int]  # per row, how many alternatives it asked for
    chosen_logprobs: torch.Tensor | None = None  # [B]
    top_values: torch.Tensor | None = None  # [B, kmax]
    top_ids: torch.Tensor | None = None  # [B, kmax]

    _ready: torch.cuda.Event | None = None
    _host: dict[str, torch.Tensor] = field(default_factory=dict)

    def start_copy(self) -> None:
        """Queue the device-to-host copies now, right behind the draw, and mark them with an
        event: ``resolve`` then waits for this step only, not for a later step queued behind
        it on the same stream (the overlapped scheduler launches step N+1 before resolving N).
        ``tokens`` stays on the device, where the next step reads it."""
        if self.tokens.device.type != "cuda":
            return
        for name in ("tokens", "chosen_logprobs", "top_values", "top_ids"):
            t = getattr(self, name)
            if t is not None:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                self._host[name] = host
        self._ready = torch.cuda.Event()
        self._ready.record()

    def _get(self, name: str) -> torch.Tensor | None:
        return self._host.get(name, getattr(self, name))

    def ready(self) -> bool:
        """Whether ``resolve`` would return at once (the draw and its copies have run)."""
        return self._ready is None or bool(self._ready.query())

    def host_tokens(self) -> np.ndarray:
        """The drawn token ids on the host, waiting for this step's copy only; callable from
        any thread (the wait releases the GIL): the grammar fill threads advance on them
        while the scheduler thread still plans the next step."""
        if self._ready is not None and not self._ready.query():  # a landed copy needs no wait
            self._ready.synchronize()
        tokens = self._get("tokens")
        assert tokens is not None, "a pending sample always has tokens"
        return tokens.numpy()

    def resolve(self) -> SampleOutput:
        """The host values (the one wait of a step)."""
        if self._ready is not None:
            self._ready.synchronize()
        out_top: list[list[tuple[int, float]]] | None = None
        top_values, top_ids = self._get("top_values"), self._get("top_ids")
        if top_values is not None and top_ids is not None:
            vals, ids = top_values.tolist(), top_ids.tolist()
            out_top = [list(zip(ids[b][:k], vals[b][:k])) for b, k in enumerate(self.top_k)]
        chosen = self._get("chosen_logprobs")
        tokens = self._get("tokens")
        assert tokens is not None, "a pending sample always has tokens"
        return SampleOutput(
            token_ids=tokens.tolist(),
            logprobs=chosen.tolist() if chosen is not None else None,
            top_logprobs=out_top,
        )


def _col(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """[B] host floats -> [B, 1] tensor on the logits' device (a pinned, non-blocking copy: a
    pageable one would wait for the queued forward and stall the overlapped scheduler)."""
    return host_to_device(values, like.dtype, like.device).unsqueeze(1)


def _token_index(
    id_lists: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (row, token) coordinates of ragged id lists, for indexing [B, V] tensors."""
    # numpy builds these from python ints ~10x faster than torch.tensor(list) does.
    lengths = np.fromiter((len(ids) for ids in id_lists), dtype=np.int64, count=len(id_lists))
    total = int(lengths.sum())
    tok = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=total)
    row = np.repeat(np.arange(len(id_lists), dtype=np.int64), lengths)
    return host_to_device(row, torch.int64, device), host_to_device(tok, torch.int64, device)  # [N] each


class Sampler:
    """Stateless: per-request state (generators, token history) comes in with each row."""

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> SampleOutput:
        return self.draw(logits, rows).resolve()

    def draw(self, logits: torch.Tensor, rows: Sequence[SamplerRow],
             bitmask: torch.Tensor | None = None) -> PendingSample:
        """Queue the draw on the logits' device; nothing waits for it until ``resolve()``.

        ``bitmask``: [B, ceil(V / 32)] int32 on the device, the tokens each row's grammar
        allows (radixrt/constrained). It and each row's logit_bias apply first, so penalties,
        logprobs and the draw all see the constrained distribution."""
        assert logits.dim() == 2, f"logits must be [B, V], got shape {tuple(logits.shape)}"
        assert logits.shape[0] == len(rows), f"{logits.shape[0]} logit rows for {len(rows)} rows"
        x = self._constrain(logits.float(), rows, bitmask, copied=logits.dtype != torch.float32)
        x = self._apply_penalties(x, rows)  # [B, V], new tensor

        want_lp = any(r.params.logprobs or r.params.top_logprobs > 0 for r in rows)
        logprobs = torch.log_softmax(x, dim=-1) if want_lp else None  # [B, V]

        greedy = [r.params.is_greedy for r in rows]
        greedy_tok = x.argmax(dim=-1)  # [B]; ties -> lowest id
        if all(greedy):
            tokens = greedy_tok
        else:
            sampled = self._draw(self._filter(x, rows), rows)  # [B]
            if any(greedy):
                mask = host_to_device(greedy, torch.bool, x.device)
                tokens = torch.where(mask, greedy_tok, sampled)
            else:
                tokens = sampled

        pending = PendingSample(tokens=tokens, top_k=[r.params.top_logprobs for r in rows])
        if logprobs is not None:
            pending.chosen_logprobs = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)  # [B]
            kmax = max(pending.top_k)
            if kmax > 0:
                pending.top_values, pending.top_ids = logprobs.topk(
                    min(kmax, logprobs.shape[1]), dim=-1
                )  # [B, k]
        pending.start_copy()
        return pending

    def prompt_logprobs(self, logits: torch.Tensor, next_tokens: torch.Tensor, top_k: int = 0
                        ) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """logits [T, V] at prompt positions, next_tokens [T]: logprob of each actual next
        token, and with ``top_k`` the k most likely next tokens per position (id, logprob;
        most likely first; [] without), from the same softmax."""
        assert logits.dim() == 2 and next_tokens.shape == logits.shape[:1], (
            f"need logits [T, V] and next_tokens [T], got {tuple(logits.shape)} "
            f"and {tuple(next_tokens.shape)}"
        )
        lp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
        idx = next_tokens.to(device=lp.device, dtype=torch.long).unsqueeze(1)  # [T, 1]
        chosen = lp.gather(1, idx).squeeze(1).tolist()
        if top_k <= 0:
            return chosen, []
        vals, ids = lp.topk(min(top_k, lp.shape[1]), dim=-1)  # [T, k] each
        return chosen, [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]

    # ---- pipeline stages -------------------------------------------------------------------

    @staticmethod
    def _constrain(x: torch.Tensor, rows: Sequence[SamplerRow], bitmask: torch.Tensor | None,
                   copied: bool) -> torch.Tensor:
        """logit_bias (one sparse add) then the grammar bitmask (one fused pass), in place on a
        copy: the caller's logits are the runner's and stay as computed."""
        biases = [r.params.logit_bias for r in rows]
        banned = any(r.banned for r in rows)
        if bitmask is None and not any(biases) and not banned:
            return x
        if not copied:
            x = x.clone()
        if any(biases):
            from radixrt.constrained.bias import apply_logit_bias

            apply_logit_bias(x, biases)
        if bitmask is not None:
            from radixrt.kernels.token_bitmask import apply_token_bitmask

            apply_token_bitmask(x, bitmask)
        if banned:  # one sparse write; a row never bans its whole vocabulary (EOS + stops)
            row, tok = _token_index([r.banned for r in rows], x.device)
            x[row, tok] = -math.inf
        return x

    @staticmethod
    def _apply_penalties(x: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """Returns penalized logits; never writes into ``x``.

        Works on the (row, token) pairs of the token history only, O(history) instead of
        O(B * V). Duplicate pairs are harmless: plain index_put_ writes the same value twice,
        and the frequency term uses accumulate=True on purpose, to count them.
        """
        rep = [r.params.repetition_penalty for r in rows]
        freq = [r.params.frequency_penalty for r in rows]
        pres = [r.params.presence_penalty for r in rows]
        use_rep = any(p != 1.0 for p in rep)
        use_fp = any(f != 0.0 for f in freq) or any(p != 0.0 for p in pres)
        if not (use_rep or use_fp):
            return x
        x = x.clone()
        if use_rep:
            # HF: every token seen in prompt + output is pushed toward "less likely":
            # positive logits divided, negative multiplied.
            ids = [
                [*r.prompt_token_ids, *r.output_token_ids] if p != 1.0 else []
                for r, p in zip(rows, rep)
            ]
            row, tok = _token_index(ids, x.device)
            p = host_to_device(rep, x.dtype, x.device)[row]  # [N]
            vals = x[row, tok]  # [N]
            x[row, tok] = torch.where(vals > 0, vals / p, vals * p)
        if use_fp:
            # OpenAI: logit -= count * frequency_penalty + (count > 0) * presence_penalty,
            # counting generated tokens only.
            out_ids: list[Sequence[int]] = [
                r.output_token_ids if (f != 0.0 or p != 0.0) else []
                for r, f, p in zip(rows, freq, pres)
            ]
            row, tok = _token_index(out_ids, x.device)
            pres_t = host_to_device(pres, x.dtype, x.device)[row]  # [N]
            freq_t = host_to_device(freq, x.dtype, x.device)[row]  # [N]
            x[row, tok] = x[row, tok] - pres_t  # once per distinct token
            x.index_put_((row, tok), -freq_t, accumulate=True)  # once per occurrence
        return x

    @staticmethod
    def _filter(x: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """Temperature, then top-k, top-p, min-p. Returns [B, V] logits with -inf where removed.

        Greedy rows pass through with temperature 1; their result is replaced by argmax anyway.
        """
        temps = [r.params.temperature if not r.params.is_greedy else 1.0 for r in rows]
        if any(t != 1.0 for t in temps):
            x = x / _col(temps, x)

        V = x.shape[1]
        ks = [min(r.params.top_k, V) if r.params.top_k_enabled else V for r in rows]
        ps = [r.params.top_p for r in rows]
        min_ps = [r.params.min_p for r in rows]
        use_k = any(k < V for k in ks)
        use_p = any(p < 1.0 for p in ps)
        use_min_p = any(m > 0.0 for m in min_ps)

        if use_min_p:
            # p_i >= min_p * p_max  <=>  l_i >= l_max + log(min_p); needs no softmax. With
            # min_p == 0 the bound is -inf and nothing is removed.
            bound = x.amax(dim=-1, keepdim=True) + _col(
                [math.log(m) if m > 0 else -math.inf for m in min_ps], x
            )  # [B, 1]
            x = x.masked_fill(x < bound, -math.inf)
        if not (use_k or use_p):
            return x
        if use_p and not use_k and x.is_cuda:
            # The same nucleus without sorting the vocabulary (3x faster at 256 x 152k); a tie
            # at the threshold is kept whole instead of being cut by index.
            from radixrt.kernels.top_p import top_p_filter

            return top_p_filter(x.contiguous(), _col(ps, x).squeeze(1))
        # With every row capped by top_k, the cuts only need the kmax best logits: topk on a
        # small k is far cheaper than sorting the whole vocabulary.
        width = max(ks) if all(k < V for k in ks) else V

        # Both cuts work on the descending order. stable=True fixes the order among ties, so a
        # row's kept set depends only on its own logits (on the topk path, an exact tie at the
        # k-th place may resolve differently with a different batch maximum k).
        #   rank       0     1     2     3   ...
        #   sorted    l_max  ...
        #   excl_cum  0     p0    p0+p1 ...      keep rank j iff j < k and excl_cum[j] < top_p
        # rank 0 always survives (k >= 1, top_p > 0), so a row never ends up all -inf.
        if width < V:
            sorted_x, order = x.topk(width, dim=-1)  # [B, W] each, descending
        else:
            sorted_x, order = x.sort(dim=-1, descending=True, stable=True)  # [B, V] each
        ranks = torch.arange(width, device=x.device).unsqueeze(0)  # [1, W]
        drop = torch.zeros_like(sorted_x, dtype=torch.bool)
        if use_k:
            drop |= ranks >= host_to_device(ks, torch.int64, x.device).unsqueeze(1)
        if use_p:
            probs = torch.softmax(sorted_x.masked_fill(drop, -math.inf), dim=-1)  # [B, W]
            excl_cum = probs.cumsum(dim=-1) - probs
            # top_p == 1 must keep everything, even where cumsum rounding reaches 1.0 early.
            drop |= excl_cum >= _col([p if p < 1.0 else math.inf for p in ps], x)
        sorted_x = sorted_x.masked_fill(drop, -math.inf)
        out = torch.empty_like(x) if width == V else torch.full_like(x, -math.inf)
        return out.scatter_(1, order, sorted_x)

    @staticmethod
    def _draw(x: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """Categorical draw per row from filtered logits [B, V] -> token ids [B]."""
        probs = torch.softmax(x, dim=-1)  # [B, V]; removed tokens are exactly 0
        unseeded = [r.generator is None and not r.params.is_greedy for r in rows]
        if any(unseeded):
            # One batched fill from the device's default generator for all unseeded rows.
            q = torch.empty_like(probs).exponential_()
        else:
            q = torch.ones_like(probs)  # greedy rows' values are discarded by the caller
        for b, r in enumerate(rows):
            if r.generator is not None and not r.params.is_greedy:
                q[b].exponential_(generator=r.generator)
        return (probs / q.clamp_min_(_MIN_EXP)).argmax(dim=-1)
