"""Jump-forward: append the tokens a grammar forces next without a decode step each.

For each live constrained sequence whose grammar forces at least ``MIN_JUMP_TOKENS`` tokens
next (xgrammar's greedy longest match of the forced text, the last token held back when a
longer one could extend it), the matcher accepts them and the caller appends them to the
output; the next step computes them as one chunk instead of one decode step each.

Only when ``SequenceGrammars.jump_forward_enabled`` (RADIXRT_GRAMMAR_JUMP_FORWARD=1), and
never for a request that asks for logprobs (forced tokens have none). Runs are cut to leave
room for one sampled token under max_new_tokens and the context. The caller's draw in flight
for such a sequence sampled the position the run now fills: it is dropped.

Why off by default: it costs one xgrammar call per constrained row per step on the scheduler
thread, and each jump makes the next step synchronous (the step launched behind it would feed
the dropped token); the tokens may also differ from what the model would have picked for the
same forced text (a different tokenization), so the output after a jump can differ from a run
without it (the text stays valid).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixrt.constrained.sequences import SequenceGrammars
    from radixrt.engine.request import Sequence as Seq

# A forced run shorter than this saves no step (its one token decodes as fast), so it is left
# to the normal draw.
MIN_JUMP_TOKENS = 2


def forced_runs(grammars: SequenceGrammars, seqs: Sequence[Seq], live: Sequence[bool],
                max_context_len: int) -> dict[int, list[int]]:
    """The forced runs the matchers accepted, by sequence id (the fill threads are idle)."""
    out: dict[int, list[int]] = {}
    for seq, ok in zip(seqs, live):
        p = seq.params
        if not ok or p.constraint is None or p.logprobs or p.top_logprobs:
            continue
        m = grammars.matcher(seq)
        if m is None or m.done:
            continue
        room = min(p.max_new_tokens - len(seq.output_ids),
                   max_context_len - seq.num_tokens) - 1
        if room < MIN_JUMP_TOKENS:
            continue
        toks = [int(t) for t in m.raw.find_jump_forward_tokens()][:room]
        if len(toks) < MIN_JUMP_TOKENS:
            continue
        taken = 0
        for t in toks:
            if not m.advance(t):  # never: xgrammar derived them from this state
                m.failed = False
                break
            taken += 1
        if taken:
            out[id(seq)] = toks[:taken]
            grammars.jumps += 1
            grammars.jump_tokens += taken
    return out
