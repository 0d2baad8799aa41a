"""SGLang's ``meta_info`` for native ``/generate``: finish_reason and the logprob rows.

Rows are ``[logprob, token_id, text-or-None]`` (text with ``return_text_in_logprobs``);
``*_top_logprobs`` hold, per position, a list of such rows, most likely first. Input rows cover
prompt tokens ``logprob_start_len`` .. end, and the first of them has no logprob (None), as in
SGLang. Rendered rows are kept, so a stream (cumulative, like SGLang's) renders each token once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixrt.server.generation import Generation
from radixrt.server.native_protocol import LogprobOptions
from radixrt.server.tokenization import TextCodec

Row = list[Any]  # [logprob | None, token_id, text | None]


def finish_reason(reason: str | None, matched: str | int | None,
                  max_new_tokens: int) -> dict[str, Any] | None:
    if reason is None:
        return None  # still running (stream chunks)
    if reason == "length":
        return {"type": "length", "length": max_new_tokens}
    if reason == "abort":
        return {"type": "abort", "message": "aborted by /abort_request"}
    return {"type": reason, "matched": matched}


@dataclass
class _Choice:
    """One choice's rendered rows (output rows grow as tokens arrive)."""

    raw: list[tuple[int, float, list[tuple[int, float]] | None]] = field(default_factory=list)
    out_rows: list[Row] = field(default_factory=list)
    out_tops: list[list[Row]] = field(default_factory=list)
    in_rows: list[Row] | None = None
    in_tops: list[list[Row] | None] | None = None


class NativeLogprobs:
    """Logprob fields of one native job's choices (``options[i]`` None: choice i asked none)."""

    def __init__(self, codec: TextCodec | None, gen: Generation,
                 options: list[LogprobOptions | None]) -> None:
        self.codec, self.gen, self.options = codec, gen, options
        self.choices = [_Choice() for _ in options]

    def wants(self, i: int) -> bool:
        return self.options[i] is not None

    def add(self, i: int, token_ids: list[int], logprobs: list[float] | None,
            tops: list[list[tuple[int, float]]] | None) -> None:
        if self.options[i] is None or logprobs is None:
            return
        c = self.choices[i]
        for k, (tok, lp) in enumerate(zip(token_ids, logprobs)):
            c.raw.append((tok, lp, tops[k] if tops is not None else None))

    def _row(self, lp: float | None, tok: int, text: bool) -> Row:
        return [lp, tok, self.codec.piece(tok) if text and self.codec is not None else None]

    def _tops(self, top: list[tuple[int, float]] | None, text: bool) -> list[Row]:
        return [self._row(v, t, text) for t, v in (top or [])]

    def fields(self, i: int) -> dict[str, Any]:
        opt = self.options[i]
        if opt is None:
            return {}
        c = self.choices[i]
        for tok, lp, top in c.raw[len(c.out_rows):]:
            c.out_rows.append(self._row(lp, tok, opt.with_text))
            if opt.top_k:
                c.out_tops.append(self._tops(top, opt.with_text))
        if c.in_rows is None:
            self._input_rows(i, opt, c)
        out: dict[str, Any] = {"input_token_logprobs": c.in_rows or [],
                               "output_token_logprobs": c.out_rows}
        if opt.top_k:
            out["input_top_logprobs"] = c.in_tops or []
            out["output_top_logprobs"] = c.out_tops
        return out

    def _input_rows(self, i: int, opt: LogprobOptions, c: _Choice) -> None:
        """Rows for prompt tokens start .. end (set once the engine sent what they need)."""
        sub = self.gen.sub_of(i)
        ids = sub.prompt_ids
        if opt.start is None or opt.start >= len(ids):
            c.in_rows, c.in_tops = [], []
            return
        scored = sub.params.prompt_logprobs
        if scored and sub.prompt_logprobs is None:
            return  # not arrived yet (a stream chunk before the end of prefill)
        lps = sub.prompt_logprobs or []
        tops = sub.prompt_top_logprobs or []
        rows, top_rows = [], []
        for j in range(opt.start, len(ids)):
            first = j == opt.start  # SGLang: the first row of the window has no logprob
            rows.append(self._row(None if first or not scored else lps[j], ids[j],
                                  opt.with_text))
            if opt.top_k:
                top_rows.append(None if first or not tops else
                                self._tops(tops[j], opt.with_text))
        c.in_rows, c.in_tops = rows, top_rows
