"""Turns the scheduler's work list into a ForwardBatch plus a map of which logits rows belong to
which sequence (the sampling row, and prompt-logprob rows when a request asked for them).

    work        (seqA, 5)        (seqB, 1)
    new tokens  a0 a1 a2 a3 a4   b0
    logits rows [a0 a1 a2 a3]*   [b0]         * prompt-logprob rows only when asked;
                           ^sample           otherwise just each finished chunk's last token
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from radixrt.cache.device_pages import DevicePageTable
from radixrt.engine.batch import ForwardBatch, host_to_device, pack_forward_batch
from radixrt.engine.cascade_groups import PrefixGrouper
from radixrt.engine.request import Sequence


@dataclass(slots=True)
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
    table: DevicePageTable,
    *,
    pending: dict[int, int] | None = None,
    pending_tokens: torch.Tensor | None = None,
    cascade: PrefixGrouper | None = None,
) -> StepBatch:
    """``pending`` maps id(seq) -> row of ``pending_tokens`` (the previous step's device draw)
    for sequences whose input token the host has not read yet (overlap). ``cascade``: group a
    pure-decode step's sequences by shared cached prefix (``ForwardBatch.cascade``).

    Host work is O(batch + new tokens + changed pages): a decoding sequence costs a few list
    operations whatever its length, because its pages already sit in its device row and only
    the page it just crossed into (if any) is written (``table.stage`` / ``flush``)."""
    ps = table.page_size
    tokens: list[int] = []  # input id of every new token (0 where pending fills it)
    slots: list[int] = []  # its flat KV slot
    prefix_lens = [seq.kv_len for seq, _ in work]
    extend_lens = [n for _, n in work]
    rows: list[int] = []
    logits_idx: list[int] = []  # token rows of the batch that need logits, in logits order
    items: list[ItemRows] = []
    fill_at: list[int] = []  # batch token rows to fill from pending_tokens
    fill_from: list[int] = []
    stage = table.stage
    add_row, add_token, add_slot, add_item, add_logit = (
        rows.append, tokens.append, slots.append, items.append, logits_idx.append
    )
    pending = pending or {}
    cursor = 0  # batch row of the sequence's first new token
    for (seq, n), kv in zip(work, prefix_lens):
        pages = seq.pages
        page_ids = pages.pages
        row = pages.row
        if not row or pages.synced != len(page_ids) or pages.stale:  # else: nothing to write
            row = stage(pages)
        add_row(row)
        assert n >= 1 and len(page_ids) * ps >= kv + n, (
            f"{seq.rid}: {n} new tokens at {kv} but pages cover {len(page_ids) * ps} slots"
        )
        if n == 1:
            add_slot(int(page_ids[kv // ps]) * ps + kv % ps)  # an int32 array: as int
        else:
            slots.extend(pages.slots(kv, kv + n))
        if pending and id(seq) in pending:
            assert n == 1, f"{seq.rid}: a pending-token sequence computes exactly one token"
            fill_at.append(cursor)  # the input id is on the device; 0 is a placeholder
            fill_from.append(pending[id(seq)])
            add_token(0)
            add_item(ItemRows(len(logits_idx)))
            add_logit(cursor)
        else:
            plen = len(seq.prompt_ids)
            out = seq.output_ids
            if n == 1 and kv + 1 == plen + len(out):  # decoding (or a 1-token prompt): sample
                add_token(out[kv - plen] if kv >= plen else seq.prompt_ids[kv])
                add_item(ItemRows(len(logits_idx)))
                add_logit(cursor)
            else:
                assert kv + n <= plen + len(out), f"{seq.rid}: bad chunk [{kv}, {kv + n})"
                tokens.extend(token_slice(seq, kv, kv + n))
                add_item(_chunk_rows(seq, kv, kv + n, cursor, logits_idx))
        cursor += n
    table.flush()  # before the forward is queued: it reads the rows on the same stream
    forward = pack_forward_batch(
        input_ids=np.array(tokens, dtype=np.int64), extend_lens=extend_lens,
        prefix_lens=prefix_lens, req_rows=rows, out_slots=np.array(slots, dtype=np.int64),
        logits_indices=np.array(logits_idx, dtype=np.int64), table=table,
    )
    if cascade is not None and forward.is_decode:
        forward.cascade = cascade.group([seq for seq, _ in work], rows, prefix_lens)
    if fill_at:
        assert pending_tokens is not None, "pending sequences need the previous step's tokens"
        src = pending_tokens.index_select(0, host_to_device(fill_from, torch.int64, pending_tokens.device))
        forward.input_ids.index_copy_(0, host_to_device(fill_at, torch.int64, table.device),
                                      src.to(table.device))
    return StepBatch(forward=forward, items=items)


def _chunk_rows(seq: Sequence, start: int, end: int, cursor: int, logits_idx: list[int]) -> ItemRows:
    """Logits rows of a prefill chunk [start, end) whose first token is batch row ``cursor``:
    prompt-logprob rows when asked, and the sampling row when the chunk ends the prompt."""
    item = ItemRows()
    plen = len(seq.prompt_ids)
    last = None
    if seq.params.prompt_logprobs and seq.prompt_logprobs is not None:
        # Row j predicts token j + 1 (the last prompt token predicts the output); rows whose
        # logprob is already known (a resumed sequence) are skipped.
        for pos in range(max(start, len(seq.prompt_logprobs) - 1), min(end, plen - 1)):
            item.prompt_lp_rows.append(len(logits_idx))
            item.prompt_lp_targets.append(seq.prompt_ids[pos + 1])
            logits_idx.append(cursor + pos - start)
            last = pos
    if end == seq.num_tokens:
        if last != end - 1:
            logits_idx.append(cursor + end - 1 - start)
        item.sample_row = len(logits_idx) - 1
    return item
