"""The request table: the one owner of which sequences exist and what state each is in.

    add ──> waiting ──admit──> running ──finish──> (gone: deltas out, ids released)
              ^                   │
              └─────retract───────┘   (newest running first; its prefix stays in the tree)

Everything else (planning in scheduler.py, result handling in results.py, the overlapped plan in
overlap.py) reads the table and asks it for transitions; none of them edits its lists. A
transition also settles the sequence's pages with ``SequenceMemory`` (release on retract and
finish, shared KV on fork), so a sequence's state and its memory never disagree.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import torch

from radixrt.cache.page_table import SequencePages
from radixrt.engine.memory import SequenceMemory
from radixrt.engine.outputs import FinishReason, SequenceDelta
from radixrt.engine.policy import WaitingQueue
from radixrt.engine.request import SeqStatus, Sequence
from radixrt.engine.sampler import make_generator
from radixrt.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestTable:
    def __init__(self, memory: SequenceMemory, waiting: WaitingQueue, page_size: int,
                 device: torch.device | str) -> None:
        self.memory = memory
        self.waiting = waiting
        self.running: list[Sequence] = []
        self.page_size = page_size
        self.device = device
        self._by_rid: dict[str, list[Sequence]] = {}  # live requests -> their sequences
        self._aborts: list[tuple[str, int | None]] = []  # asked for, applied at the next step
        self._arrival = itertools.count()
        self.retractions = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0

    # ---- lookups -----------------------------------------------------------------------
    def __contains__(self, rid: str) -> bool:
        return rid in self._by_rid

    @property
    def rids(self) -> list[str]:
        return list(self._by_rid)

    @property
    def has_pending_aborts(self) -> bool:
        return bool(self._aborts)

    @property
    def is_empty(self) -> bool:
        return not (self.running or self.waiting or self._aborts)

    def decoding(self) -> list[Sequence]:
        """Running sequences past their prompt, oldest first."""
        return sorted((s for s in self.running if not s.in_prefill), key=_arrival)

    def prefilling(self, skip: frozenset[int] = frozenset()) -> list[Sequence]:
        """Running sequences still computing their prompt, oldest first (``skip``: ids)."""
        return sorted((s for s in self.running if s.in_prefill and id(s) not in skip),
                      key=_arrival)

    def newest_running(self) -> Sequence | None:
        return max(self.running, key=_arrival) if self.running else None

    def ordered_waiting(self) -> Iterator[Sequence]:
        return self.waiting.ordered()

    # ---- transitions -------------------------------------------------------------------
    def add(self, rid: str, prompt: list[int], params: SamplingParams,
            namespace: str | None) -> Sequence:
        assert rid not in self._by_rid, f"request id {rid!r} is already in use"
        seq = self._new_sequence(rid, 0, prompt, params, namespace)
        seq.num_forks = params.n
        self._by_rid[rid] = [seq]
        self.waiting.push(seq)
        self.prompt_tokens += len(prompt)
        return seq

    def _new_sequence(self, rid: str, index: int, prompt: list[int], params: SamplingParams,
                      namespace: str | None) -> Sequence:
        params = params.with_seed_offset(index)
        gen = None if params.seed is None else make_generator(params.seed, self.device)
        return Sequence(
            rid=rid, index=index, prompt_ids=prompt, params=params, namespace=namespace,
            arrival=next(self._arrival), pages=SequencePages(self.page_size), generator=gen,
        )

    def admit(self, seq: Sequence, matched: int) -> None:
        """waiting -> running, holding the pages admission gave it (``matched`` from cache)."""
        assert seq.status is SeqStatus.WAITING, f"{seq.rid}/{seq.index} admitted twice"
        if seq.cached_tokens < 0:  # first admission: this is what the request reports
            seq.cached_tokens = min(matched, len(seq.prompt_ids))
            self.cached_prompt_tokens += seq.cached_tokens
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def retract(self, seq: Sequence) -> None:
        """Preempt: its computed prefix goes to the tree, it requeues and resumes on a cache hit."""
        assert seq.status is SeqStatus.RUNNING, f"retract of {seq.rid}/{seq.index}, not running"
        self.memory.release(seq)
        seq.kv_len = 0
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.push(seq)
        self.retractions += 1
        logger.debug("retracted %s/%d (%d tokens)", seq.rid, seq.index, seq.num_tokens)

    def finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> SequenceDelta:
        """End a sequence (stop, length or abort); returns its last delta."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.memory.release(seq, keep_in_cache=seq.kv_len > 0)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        siblings = self._by_rid.get(seq.rid, [])
        if all(s.finished for s in siblings):  # an unforked n > 1 parent ends its request
            self._by_rid.pop(seq.rid, None)
        return seq.take_delta()

    def fork(self, parent: Sequence) -> list[Sequence]:
        """Split an n > 1 request once its prompt is prefilled; returns the children that run
        now, sharing its KV (a child without a page for its copy waits, resuming on a hit)."""
        if parent.num_forks <= 1:
            return []
        children: list[Sequence] = []
        for index in range(1, parent.num_forks):
            child = self._new_sequence(parent.rid, index, parent.prompt_ids, parent.params,
                                       parent.namespace)
            child.cached_tokens = parent.cached_tokens
            if parent.prompt_logprobs is not None:
                child.prompt_logprobs = list(parent.prompt_logprobs)
            if parent.prompt_top_logprobs is not None:
                child.prompt_top_logprobs = list(parent.prompt_top_logprobs)
            self._by_rid[parent.rid].append(child)
            if self.memory.fork(parent, child):
                child.status = SeqStatus.RUNNING
                self.running.append(child)
                children.append(child)
            else:
                self.waiting.push(child)
        parent.num_forks = 1
        return children

    # ---- aborts ------------------------------------------------------------------------
    def request_abort(self, rid: str, index: int | None) -> None:
        self._aborts.append((rid, index))

    def apply_aborts(self) -> list[SequenceDelta]:
        pending, self._aborts = self._aborts, []
        deltas: list[SequenceDelta] = []
        for rid, index in pending:
            for seq in list(self._by_rid.get(rid, [])):
                if seq.finished or (index is not None and seq.index != index):
                    continue
                if index is not None and seq.num_forks > 1:
                    continue  # the unforked parent of n samples only ends with the whole request
                deltas.append(self.finish(seq, "abort"))
        return deltas

    def abort_all(self, error: str | None = None) -> list[SequenceDelta]:
        """End every live sequence now (a failed step): one abort delta each."""
        self._aborts.clear()
        return [self.finish(seq, "abort", error)
                for seqs in list(self._by_rid.values()) for seq in list(seqs) if not seq.finished]


def _arrival(seq: Sequence) -> int:
    return seq.arrival
