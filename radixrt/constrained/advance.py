"""A step's grammar advance on the fused path (``RADIXRT_GRAMMAR_FUSED``), the scheduler
thread's share: which rows advance, and their verdicts read from the mask they were drawn
under (so the stop rules need no xgrammar call); the fill threads make the advance itself.

``ArrivingAdvance`` is an advance started before its tokens were on the host
(``SequenceGrammars.advance_on_arrival``): the fill threads wait for the draw's copy and
advance the moment it lands, while the scheduler thread plans and launches the next step;
``settle`` gives the verdicts once the scheduler thread has read the tokens itself.

No xgrammar import here: the engine imports this module without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from radixrt.constrained.batch import PendingMask
    from radixrt.constrained.matcher import Matcher
    from radixrt.constrained.sequences import SequenceGrammars
    from radixrt.engine.request import Sequence as Seq


def advancing_rows(grammars: SequenceGrammars, seqs: Sequence[Seq], mask_rows: Sequence[int],
                   drawn: PendingMask | None) -> tuple[list[bool], list[tuple[int, Matcher]]]:
    """For a step's tokens: per row False if its grammar had ended (any token is refused),
    and the (row, matcher) pairs whose token the mask decides."""
    oks = [True] * len(seqs)
    check: list[tuple[int, Matcher]] = []
    drawn_rows = drawn.matchers if drawn is not None else None
    for j, seq in enumerate(seqs):
        # The matcher that filled this row (no lookup, and it says the row is constrained
        # without ``params.constraint``, a property that walks the fields); re-synced only if
        # its count moved.
        m = drawn_rows[mask_rows[j]] if drawn_rows is not None else None
        if m is None:
            if seq.params.constraint is None:
                continue
            m = grammars.matcher(seq)
            if m is None:
                continue
        elif m.num_accepted != len(seq.output_ids):
            m = grammars.matcher(seq)
            assert m is not None, "a row drawn under a grammar keeps its matcher"
        if m.done:  # nothing may follow (its mask row allowed everything)
            m.failed, oks[j] = True, False
            grammars.rejected_tokens += 1
        else:
            check.append((j, m))
    return oks, check


def verdicts(grammars: SequenceGrammars, oks: list[bool], check: Sequence[tuple[int, Matcher]],
             tokens: Sequence[int], mask_rows: Sequence[int],
             drawn: PendingMask | None) -> list[tuple[Matcher, int]]:
    """The grammar's verdict on ``tokens`` (one per ``check`` pair) from the mask they were
    drawn under, into ``oks`` and the refused matchers; returns the accepted pairs."""
    if check and drawn is not None:
        from radixrt.constrained.batch import allowed_in_mask

        bits = allowed_in_mask(drawn.host, [mask_rows[j] for j, _ in check], tokens)
        for (j, m), ok in zip(check, bits):
            if not ok:
                m.failed, oks[j] = True, False
                grammars.rejected_tokens += 1
    return [(m, t) for (j, m), t in zip(check, tokens) if oks[j]]


def after_event(event: torch.cuda.Event, then: Callable[[], np.ndarray]) -> np.ndarray:
    """``then()`` once ``event`` has completed (a fill thread's wait for the tokens)."""
    event.synchronize()
    return then()


@dataclass
class ArrivingAdvance:
    """An advance started before its tokens were on the host."""

    grammars: SequenceGrammars
    oks: list[bool]
    check: list[tuple[int, Matcher]]
    mask_rows: Sequence[int]
    drawn: PendingMask | None

    def settle(self, token_ids: Sequence[int]) -> list[bool]:
        """Per row, whether the grammar accepts its token (``token_ids``: all the draw's);
        accepts are counted here (the fill threads' advance touches only xgrammar)."""
        toks = [int(token_ids[self.mask_rows[j]]) for j, _ in self.check]
        for m, t in verdicts(self.grammars, self.oks, self.check, toks, self.mask_rows,
                             self.drawn):
            m._record(t, True)
        return self.oks


def start_ahead(grammars: SequenceGrammars, seqs: Sequence[Seq]) -> tuple[bool, PendingMask | None]:
    """The grammar process's path: the mask of a step just launched (``seqs``, its draw
    order), started before the step ahead of it is read, while its advance is in flight (the
    process fills from its copies once they have their tokens); (False, None) where not
    possible (then the mask starts once the tokens are counted, ``start_queued``)."""
    masks = grammars._masks
    advancing = grammars._advancing
    if masks is None or not masks.lazy or not advancing:
        return False, None
    from radixrt.constrained.proc_masks import ProcessMasks

    assert isinstance(masks, ProcessMasks), "lazy matchers are the grammar process's"
    rows: list[Matcher | None] = []
    ahead: list[bool] = []
    for seq in seqs:
        m = advancing.get(id(seq))
        ahead.append(m is not None)
        if m is None and seq.params.constraint is not None:
            m = grammars.matcher(seq)
        rows.append(m)
    return masks.start_ahead(rows, ahead)
