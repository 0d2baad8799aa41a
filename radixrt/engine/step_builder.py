"""Turns the scheduler's work list into a ForwardBatch plus a map of which logits rows belong to
which sequence (the sampling row, and prompt-logprob rows when a request asked for them).

    work        (seqA, 5)        (seqB, 1)
    new tokens  a0 a1 a2 a3 a4   b0
    logits rows [a0 a1 a2 a3]*   [b0]         * prompt-logprob rows only when asked;
                           ^sample           otherwise just each finished chunk's last token
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from radixrt.engine.batch import ForwardBatch, build_forward_batch
from radixrt.engine.request import Sequence


@dataclass
class ItemRows:
    sample_row: int | None = None  # index into the step's logits, None = chunk mid-prompt
    prompt_lp_rows: list[int] = field(default_factory=list)
    prompt_lp_targets: list[int] = field(default_factory=list)  # the next prompt token per row


@dataclass
class StepBatch:
    forward: ForwardBatch
    items: list[ItemRows]


def token_slice(seq: Sequence, start: int, end: int) -> list[int]:
    """tokens[start:end] of prompt + output without concatenating the whole history."""
    plen = len(seq.prompt_ids)
    if start >= plen:
        return seq.output_ids[start - plen : end - plen]
    if end <= plen:
        return seq.prompt_ids[start:end]
    return seq.prompt_ids[start:] + seq.output_ids[: end - plen]


def build(work: list[tuple[Sequence, int]], page_size: int, device: torch.device) -> StepBatch:
    new_tokens: list[list[int]] = []
    logits_rows: list[list[int]] = []
    items: list[ItemRows] = []
    next_row = 0
    for seq, n in work:
        start, end = seq.kv_len, seq.kv_len + n
        assert n >= 1 and end <= seq.num_tokens, f"{seq.rid}: bad chunk [{start}, {end})"
        new_tokens.append(token_slice(seq, start, end))
        rows: list[int] = []
        item = ItemRows()
        plen = len(seq.prompt_ids)
        if seq.params.prompt_logprobs and seq.prompt_logprobs is not None:
            # Row j predicts token j + 1 (the last prompt token predicts the output); rows whose
            # logprob is already known (a resumed sequence) are skipped.
            for pos in range(max(start, len(seq.prompt_logprobs) - 1), min(end, plen - 1)):
                rows.append(pos - start)
                item.prompt_lp_rows.append(next_row)
                item.prompt_lp_targets.append(seq.prompt_ids[pos + 1])
                next_row += 1
        if end == seq.num_tokens:
            if not rows or rows[-1] != n - 1:
                rows.append(n - 1)
                next_row += 1
            item.sample_row = next_row - 1
        logits_rows.append(rows)
        items.append(item)
    forward = build_forward_batch(
        new_token_ids=new_tokens,
        prefix_lens=[seq.kv_len for seq, _ in work],
        page_tables=[seq.pages.pages for seq, _ in work],
        page_size=page_size,
        logits_rows=logits_rows,
        device=device,
    )
    return StepBatch(forward=forward, items=items)


def build_decode_continuation(
    seqs: list[Sequence], page_size: int, device: torch.device, input_ids: torch.Tensor
) -> StepBatch:
    """A decode step whose input tokens are still on the device (the previous step's draw).

    Each sequence computes position ``kv_len`` (the token the previous step sampled, not yet
    appended on the host), so its prefix is ``kv_len`` and its KV grows to ``kv_len + 1``.
    """
    forward = build_forward_batch(
        new_token_ids=[[0]] * len(seqs),  # placeholders; the real ids are on the device
        prefix_lens=[s.kv_len for s in seqs],
        page_tables=[s.pages.pages for s in seqs],
        page_size=page_size,
        device=device,
    )
    forward.input_ids = input_ids
    return StepBatch(forward=forward, items=[ItemRows(sample_row=i) for i in range(len(seqs))])
