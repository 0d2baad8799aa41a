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

from radixrt.engine.batch import ForwardBatch, build_forward_batch, host_to_device
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


def build(
    work: list[tuple[Sequence, int]],
    page_size: int,
    device: torch.device,
    *,
    pending: dict[int, int] | None = None,
    pending_tokens: torch.Tensor | None = None,
) -> StepBatch:
    """``pending`` maps id(seq) -> row of ``pending_tokens`` (the previous step's device draw)
    for sequences whose input token the host has not read yet (overlap)."""
    new_tokens: list[list[int]] = []
    logits_rows: list[list[int]] = []
    items: list[ItemRows] = []
    next_row = 0
    token_cursor = 0
    fill_at: list[int] = []  # batch token rows to fill from pending_tokens
    fill_from: list[int] = []
    for seq, n in work:
        if pending is not None and id(seq) in pending:
            assert n == 1, f"{seq.rid}: a pending-token sequence computes exactly one token"
            new_tokens.append([0])  # placeholder; the real id is on the device
            logits_rows.append([0])
            items.append(ItemRows(sample_row=next_row))
            fill_at.append(token_cursor)
            fill_from.append(pending[id(seq)])
            next_row += 1
            token_cursor += 1
            continue
        token_cursor += n
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
    if fill_at:
        assert pending_tokens is not None, "pending sequences need the previous step's tokens"
        src = pending_tokens.index_select(0, host_to_device(fill_from, torch.int64, pending_tokens.device))
        forward.input_ids.index_copy_(0, host_to_device(fill_at, torch.int64, device), src.to(device))
    return StepBatch(forward=forward, items=items)

