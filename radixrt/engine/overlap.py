"""Overlapped scheduling: plan and launch step N+1 while step N still runs on the device.

    host    | plan N+1 | launch N+1 | read N's tokens, stop rules, deltas | plan N+2 | ...
    device  |      ... step N ...   |            step N+1                 |    ...

Sequences sampled in step N continue in N+1 with their newest token taken from N's device
output (the host has not read it yet); waiting requests may be admitted and chunked prompts
continued alongside, as long as no sequence has to be retracted. A sequence that N ends (a stop
token) still computes one extra token in N+1, which is dropped. Anything needing the host to
know N's tokens first (penalties over the output, retraction, aborts) takes the synchronous path.

It reads the request table and grows pages through ``SequenceMemory``; admitting and continuing
prompts goes through the scheduler's ``plan_prefill`` (passed in), so it changes no state itself.
"""

from __future__ import annotations

from collections.abc import Callable

from radixrt.engine.memory import SequenceMemory
from radixrt.engine.request import Sequence
from radixrt.engine.requests import RequestTable
from radixrt.engine.results import InFlight, Work, will_hit_length

# Work for the step and, for sequences fed by the previous step's device tokens, their row in
# that step's draw (id(seq) -> row).
Plan = tuple[Work, dict[int, int]]
PlanPrefill = Callable[[Work, frozenset[int]], None]


def plan_continuation(prev: InFlight, table: RequestTable, memory: SequenceMemory,
                      plan_prefill: PlanPrefill, max_context_len: int) -> Plan | None:
    """The next step's plan, or None when it needs ``prev``'s tokens on the host first."""
    if prev.pending is None or table.has_pending_aborts or prev.dropped:
        return None  # (dropped: a jump-forward run must be computed from the host's tokens)
    row_of = {id(s): i for i, s in enumerate(prev.sampled)}
    carried: list[Sequence] = []
    for seq in table.running:
        if id(seq) not in row_of:
            if not seq.in_prefill:
                return None  # a decoding sequence outside N: the synchronous path handles it
            continue
        if _uses_penalties(seq):
            return None  # penalties read the output history, which lacks N's token
        if not will_hit_length(seq, 1, max_context_len):  # N's token ends it: nothing to continue
            carried.append(seq)
    for seq in carried:
        if not memory.grow(seq, seq.kv_len + 1):
            return None  # short of pages: retraction needs the synchronous path
    work: Work = [(s, 1) for s in carried]
    plan_prefill(work, frozenset(row_of))
    if not work:
        return None
    return work, {id(s): row_of[id(s)] for s in carried}


def _uses_penalties(seq: Sequence) -> bool:
    p = seq.params
    # min_new_tokens bans stop tokens by the output length, which lacks N's token too.
    return (p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0
            or p.presence_penalty != 0.0 or p.min_new_tokens > len(seq.output_ids))
