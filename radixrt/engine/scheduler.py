"""The scheduler: a thin loop over parts that each own one thing.

    waiting queue + policy  -> order admissions      (policy.py)
    PrefillBudget           -> prompt tokens per step (budget.py)
    SequenceMemory          -> pages, prefix cache    (memory.py)
    running list            -> who is in the batch
    ModelRunner + Sampler   -> one forward, one draw  (runner.py, sampler.py)

One step: apply aborts; give every decoding sequence a slot for its next token (evicting LRU
cache, else retracting the newest sequences); continue chunked prefills and admit waiting
requests under the budget; run one mixed batch; sample; report deltas. With overlap (default on
CUDA) the next step is planned and launched before this step's tokens are read (overlap.py).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable

from radixrt.cache.page_table import SequencePages
from radixrt.config import EngineConfig
from radixrt.engine import overlap, results, step_builder
from radixrt.engine.budget import PrefillBudget
from radixrt.engine.inbatch import InBatchPrefixes
from radixrt.engine.memory import SequenceMemory
from radixrt.engine.outputs import EngineStats, FinishReason, SequenceDelta
from radixrt.engine.policy import order_waiting
from radixrt.engine.request import SeqStatus, Sequence
from radixrt.engine.runner import ModelRunner
from radixrt.engine.sampler import Sampler, make_generator
from radixrt.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Admission keeps this share of each running request's remaining output in reserve, so decode
# rarely has to retract; retraction still catches the cases the estimate misses.
DECODE_RESERVE_RATIO = 0.3
DECODE_RESERVE_CAP = 2048


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        memory: SequenceMemory,
        sampler: Sampler,
        *,
        vocab_size: int,
        max_context_len: int,
        eos_token_ids: Iterable[int],
    ) -> None:
        self.config = config
        self.runner = runner
        self.memory = memory
        self.sampler = sampler
        self.vocab_size = vocab_size
        self.max_context_len = max_context_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.page_size = config.page_size
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._by_rid: dict[str, list[Sequence]] = {}
        self._pending_aborts: list[tuple[str, int | None]] = []
        self._inflight: results.InFlight | None = None  # launched, tokens not yet read
        self._arrival = itertools.count()
        self.retractions = 0
        self.overlapped_steps = 0  # steps launched before the previous step's tokens were read
        self.prompt_tokens_total = 0
        self.cached_prompt_tokens = 0
        self.generated_tokens_total = 0

    # ---- requests in -------------------------------------------------------------------
    def add_request(
        self, rid: str, input_ids: list[int], params: SamplingParams, namespace: str | None = None
    ) -> None:
        """Queue a request; raises ValueError (nothing queued) when it cannot be served."""
        if rid in self._by_rid:
            raise ValueError(f"request id {rid!r} is already in use")
        if not input_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        bad = next((t for t in input_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(input_ids) >= self.max_context_len:
            raise ValueError(
                f"prompt has {len(input_ids)} tokens; the context window is {self.max_context_len} "
                "and at least one must be left to generate"
            )
        params.validate_for_model(self.vocab_size, self.max_context_len, len(input_ids))
        need_pages = -(-(len(input_ids) + 1) // self.page_size)
        if need_pages > self.memory.allocator.num_total:
            raise ValueError(
                f"prompt needs {need_pages} KV pages but the pool holds only "
                f"{self.memory.allocator.num_total}"
            )
        seq = self._new_sequence(rid, 0, list(input_ids), params, namespace)
        seq.num_forks = params.n
        self._by_rid[rid] = [seq]
        self.waiting.append(seq)
        self.prompt_tokens_total += len(input_ids)

    def _new_sequence(
        self, rid: str, index: int, prompt: list[int], params: SamplingParams, ns: str | None
    ) -> Sequence:
        params = params.with_seed_offset(index)
        gen = None
        if params.seed is not None:
            gen = make_generator(params.seed, self.runner.device)
        return Sequence(
            rid=rid, index=index, prompt_ids=prompt, params=params, namespace=ns,
            arrival=next(self._arrival), pages=SequencePages(self.page_size), generator=gen,
        )

    def abort_request(self, rid: str, index: int | None = None) -> None:
        """Abort a request (all its samples, or one); takes effect at the next step."""
        self._pending_aborts.append((rid, index))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._pending_aborts or self._inflight)

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[SequenceDelta]:
        """One scheduler step. With overlap, step N+1 is planned and launched while step N runs,
        then N's tokens are read (see overlap.py); otherwise N is read before N+1 is planned."""
        deltas: list[SequenceDelta] = []
        self._apply_aborts(deltas)
        prev, self._inflight = self._inflight, None
        plan = overlap.plan_continuation(self, prev) if prev is not None else None
        if prev is not None and plan is None:
            results.complete(self, prev, deltas)
            prev = None
        self.overlapped_steps += plan is not None
        work, pending = plan if plan is not None else (self._schedule(deltas), None)
        flight = None
        if work:
            batch = step_builder.build(
                work, self.runner.page_table, pending=pending,
                pending_tokens=prev.pending.tokens if prev is not None and prev.pending else None,
            )
            logits = self.runner.forward(batch.forward)
            flight = results.launch_results(self, work, batch, logits)
        if prev is not None:
            results.complete(self, prev, deltas)  # read while the step just launched runs
        if flight is not None:
            if self.config.overlap:
                self._inflight = flight
            else:
                results.complete(self, flight, deltas)
        self._debug_check()
        return deltas

    def _debug_check(self) -> None:
        if self.config.debug_invariants:
            self.memory.check_invariants(self.running)

    def _schedule(self, deltas: list[SequenceDelta]) -> list[tuple[Sequence, int]]:
        work: list[tuple[Sequence, int]] = []
        # 1. Decode: one slot each for the newest token, oldest requests first.
        for seq in sorted((s for s in self.running if not s.in_prefill), key=lambda s: s.arrival):
            if seq.status is not SeqStatus.RUNNING:
                continue  # retracted as a victim in this loop
            if self._make_room(seq, seq.kv_len + 1):
                work.append((seq, 1))
            else:
                self._finish(seq, "abort", deltas, error="out of KV cache memory")
        work = [(s, n) for s, n in work if s.status is SeqStatus.RUNNING]
        self.schedule_prefill(work, deltas)
        return work

    def schedule_prefill(
        self, work: list[tuple[Sequence, int]], deltas: list[SequenceDelta] | None,
        skip: frozenset[int] = frozenset(),
    ) -> None:
        """Continue chunked prompts, then admit waiting requests by policy, under the budget.

        ``deltas`` None: never end a request here (the overlapped path); ``skip``: ids of
        sequences whose newest token is still on the device.
        """
        budget = PrefillBudget(self.config.max_prefill_tokens, self.config.chunked_prefill_size,
                               self.page_size)
        chunked = (s for s in self.running if s.in_prefill and id(s) not in skip)
        for seq in sorted(chunked, key=lambda s: s.arrival):
            if seq.status is not SeqStatus.RUNNING:
                continue  # retracted to make room for an older prompt in this loop
            n = budget.peek(seq.num_to_compute, seq.kv_len)
            if n == 0:
                break
            if not self.memory.grow(seq, seq.kv_len + n):
                # Nothing else runs this step: only retraction can free pages (two half-done
                # prompts holding each other's room would otherwise wait forever).
                if deltas is None or work:
                    break
                if not self._make_room(seq, seq.kv_len + n):
                    self._finish(seq, "abort", deltas, error="out of KV cache memory")
                    break
            budget.take(n)
            work.append((seq, n))
        if self.waiting and not budget.exhausted:
            self._admit(budget, work)

    def _admit(self, budget: PrefillBudget, work: list[tuple[Sequence, int]]) -> None:
        cache = self.memory.cache
        admitted = InBatchPrefixes(self.page_size)
        for seq in order_waiting(self.waiting, cache, self.config.schedule_policy):
            # n > 1 samples fork after prefill: count them all against the running cap.
            if len(self.running) + seq.num_forks > self.config.max_running_requests:
                return
            if budget.exhausted:
                return
            needs_prompt_logprobs = seq.params.prompt_logprobs and seq.prompt_logprobs is None
            # Prompt logprobs need the logits of every position from logprob_start_len - 1 on,
            # so the cached prefix may only cover the positions before that.
            cap = seq.params.logprob_start_len - 1 if needs_prompt_logprobs else None
            use_cache = self.config.enable_prefix_cache
            matched = self.memory.attach_prefix(seq, max_tokens=cap)
            if use_cache and admitted.shares_stem(seq.token_array(), matched):
                # Its stem is being computed this step by another request: wait for the hit.
                self.memory.release(seq, keep_in_cache=False)
                seq.kv_len = 0
                continue
            n = budget.peek(seq.num_to_compute, seq.kv_len)
            # Admit only if the whole rest of the prompt fits (not just this chunk), next to
            # what the running sequences are still owed.
            need = self._pages(seq.num_tokens) - seq.pages.num_pages
            reserve = self._reserve_pages(extra=seq) if self.running else 0
            if n == 0 or self.memory.available_pages - need < reserve or not self.memory.grow(
                seq, seq.kv_len + n
            ):
                self.memory.release(seq, keep_in_cache=False)
                seq.kv_len = 0
                return
            budget.take(n)
            if seq.cached_tokens < 0:  # first admission: this is what the request reports
                seq.cached_tokens = min(matched, len(seq.prompt_ids))
                self.cached_prompt_tokens += seq.cached_tokens
            if use_cache:
                admitted.add(seq.token_array())
            if needs_prompt_logprobs:
                # Entry k scores prompt token k; tokens up to the cached prefix are not scored
                # (the first token never is: nothing precedes it).
                seq.prompt_logprobs = [None] * (seq.kv_len + 1)
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            work.append((seq, n))

    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _reserve_pages(self, extra: Sequence) -> int:
        """Pages the running sequences (and ``extra``) are still owed: the rest of each prompt
        and a share of each remaining output."""
        pages, tokens = 0, 0.0
        for seq in (*self.running, extra):
            if seq is not extra:
                pages += max(0, self._pages(seq.num_tokens) - seq.pages.num_pages)
            left = min(seq.params.max_new_tokens - len(seq.output_ids), DECODE_RESERVE_CAP)
            tokens += max(1.0, left * DECODE_RESERVE_RATIO) * seq.num_forks
        return pages + int(-(-tokens // self.page_size))

    def _make_room(self, seq: Sequence, tokens: int) -> bool:
        """Retract the newest other sequences until ``seq`` can hold ``tokens`` tokens."""
        while not self.memory.grow(seq, tokens):
            victim = self._newest_running(exclude=seq)
            if victim is None:
                return False
            self._retract(victim)
        return True

    def _newest_running(self, exclude: Sequence) -> Sequence | None:
        candidates = [s for s in self.running if s is not exclude]
        return max(candidates, key=lambda s: s.arrival) if candidates else None

    def _retract(self, seq: Sequence) -> None:
        """Preempt: its computed prefix goes to the tree, it requeues and resumes on a cache hit."""
        self.memory.release(seq)
        seq.kv_len = 0
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.append(seq)
        self.retractions += 1
        logger.debug("retracted %s/%d (%d tokens)", seq.rid, seq.index, seq.num_tokens)

    # ---- results -----------------------------------------------------------------------
    def _finish(
        self, seq: Sequence, reason: FinishReason, deltas: list[SequenceDelta] | None,
        error: str | None = None,
    ) -> None:
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
        if deltas is not None:
            deltas.append(self.make_delta(seq))

    def _apply_aborts(self, deltas: list[SequenceDelta]) -> None:
        pending, self._pending_aborts = self._pending_aborts, []
        for rid, index in pending:
            for seq in list(self._by_rid.get(rid, [])):
                if seq.finished or (index is not None and seq.index != index):
                    continue
                if index is not None and seq.num_forks > 1:
                    continue  # the unforked parent of n samples only ends with the whole request
                self._finish(seq, "abort", deltas)

    def make_delta(self, seq: Sequence) -> SequenceDelta:
        new = seq.output_ids[seq.sent_tokens :]
        delta = SequenceDelta(
            rid=seq.rid, index=seq.index, new_token_ids=new,
            prompt_tokens=len(seq.prompt_ids), cached_tokens=max(seq.cached_tokens, 0),
            completion_tokens=len(seq.output_ids) + (seq.matched_stop_token is not None),
            finished=seq.finished, finish_reason=seq.finish_reason, error=seq.error,
            matched_stop_token=seq.matched_stop_token,
        )
        if seq.params.logprobs or seq.params.top_logprobs:
            delta.new_logprobs = seq.logprobs[seq.sent_tokens :]
            if seq.params.top_logprobs:
                delta.new_top_logprobs = seq.top_logprobs[seq.sent_tokens :]
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            delta.prompt_logprobs = seq.prompt_logprobs
            seq.prompt_logprobs_sent = True
        seq.sent_tokens = len(seq.output_ids)
        return delta

    # ---- introspection -----------------------------------------------------------------
    def stats(self) -> EngineStats:
        cache = self.memory.cache.stats()
        in_tree = self.memory.cache.evictable_pages + self.memory.cache.locked_pages
        private = self.memory.allocator.num_used - in_tree
        return EngineStats(
            running_requests=len(self.running), queued_requests=len(self.waiting),
            total_pages=self.memory.allocator.num_total, free_pages=self.memory.allocator.num_free,
            evictable_pages=cache.evictable_pages, locked_pages=cache.locked_pages,
            private_pages=private, wasted_slots=sum(s.pages.wasted_slots for s in self.running),
            cached_tokens=cache.cached_tokens, hit_tokens=self.cached_prompt_tokens,
            query_tokens=self.prompt_tokens_total, evictions=cache.evictions,
            retractions=self.retractions, prompt_tokens_total=self.prompt_tokens_total,
            generated_tokens_total=self.generated_tokens_total,
            extra={"held_page_refs": float(sum(s.pages.num_pages for s in self.running)),
                   "overlapped_steps": float(self.overlapped_steps)},
        )

    def flush_cache(self) -> bool:
        """Drop every unlocked cache entry (only allowed when idle, as SGLang does)."""
        if self.running or self.waiting or self._inflight:
            return False
        return self.memory.flush_cache()

