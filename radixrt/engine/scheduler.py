"""The scheduler: a thin loop over parts that each own one thing.

    RequestTable            -> which sequences exist, in which state  (requests.py)
    WaitingQueue + policy   -> order admissions                        (policy.py)
    PrefillBudget           -> prompt tokens per step                  (budget.py)
    SequenceMemory          -> pages, prefix cache                     (memory.py)
    ModelRunner + Sampler   -> one forward, one draw                   (runner.py, sampler.py)
    StepResults             -> what a step computed, stop rules        (results.py)

One step: apply aborts; give every decoding sequence a slot for its next token (evicting LRU
cache, else retracting the newest running sequences, possibly the one asking); continue chunked
prefills and admit waiting requests under the budget; run one mixed batch; sample; report deltas.
With overlap (default on CUDA) the next step is planned and launched before this step's tokens
are read (overlap.py). Planning lives here; every state change goes through the table.
"""

from __future__ import annotations

from collections.abc import Iterable

from radixrt.config import EngineConfig
from radixrt.constrained.sequences import SequenceGrammars
from radixrt.engine import overlap, step_builder
from radixrt.engine.budget import PrefillBudget
from radixrt.engine.inbatch import InBatchPrefixes
from radixrt.engine.memory import LoadRoom, SequenceMemory
from radixrt.engine.outputs import EngineStats, SequenceDelta, forward_steps_key
from radixrt.engine.policy import WaitingQueue
from radixrt.engine.request import SeqStatus, Sequence
from radixrt.engine.requests import RequestTable
from radixrt.engine.results import InFlight, StepResults, Work
from radixrt.engine.runner import ModelRunner
from radixrt.engine.sampler import Sampler
from radixrt.sampling_params import MAX_SEED, SamplingParams

# Admission keeps this share of each running request's remaining output in reserve, so decode
# rarely has to retract; retraction still catches the cases the estimate misses.
DECODE_RESERVE_RATIO = 0.3
DECODE_RESERVE_CAP = 2048
OUT_OF_MEMORY = "out of KV cache memory"


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
        grammars: SequenceGrammars | None = None,
    ) -> None:
        self.config = config
        self.runner = runner
        self.memory = memory
        self.vocab_size = vocab_size
        self.max_context_len = max_context_len
        self.page_size = config.page_size
        self.requests = RequestTable(memory, WaitingQueue(memory.cache, config.schedule_policy),
                                     config.page_size, runner.device)
        self.results = StepResults(self.requests, memory, sampler, eos_token_ids=eos_token_ids,
                                   max_context_len=max_context_len, grammars=grammars)
        self._inflight: InFlight | None = None  # launched, tokens not yet read
        self.overlapped_steps = 0  # steps launched before the previous step's tokens were read

    @property
    def running(self) -> list[Sequence]:
        return self.requests.running

    @property
    def waiting(self) -> WaitingQueue:
        return self.requests.waiting

    # ---- requests in -------------------------------------------------------------------
    def add_request(
        self, rid: str, input_ids: list[int], params: SamplingParams, namespace: str | None = None
    ) -> None:
        """Queue a request; raises ValueError (nothing queued) when it cannot be served."""
        grammars = self.results.grammars
        if rid in self.requests or (grammars is not None and grammars.is_parked(rid)):
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
        if params.constraint is not None:
            if grammars is None:
                raise ValueError(f"{params.constraint[0]}: this engine has no grammar support")
            # A bad grammar is refused here; a slow one waits outside the queue (step() adds it).
            if not grammars.ready_or_park(rid, list(input_ids), params, namespace):
                return
        if params.seed is not None and not 0 <= params.seed <= MAX_SEED - (params.n - 1):
            # Sample i draws with seed + i, made when it forks mid-step: reject it here instead.
            raise ValueError(f"seed must be in [0, 2^64 - n], got {params.seed} with n={params.n}")
        need_pages = -(-(len(input_ids) + 1) // self.page_size)
        if need_pages > self.memory.allocator.num_total:
            raise ValueError(
                f"prompt needs {need_pages} KV pages but the pool holds only "
                f"{self.memory.allocator.num_total}"
            )
        self.requests.add(rid, list(input_ids), params, namespace)

    def abort_request(self, rid: str, index: int | None = None) -> None:
        """Abort a request (all its samples, or one); takes effect at the next step."""
        grammars = self.results.grammars
        if index is None and grammars is not None and grammars.unpark(rid):
            return  # still compiling its grammar: nothing was queued
        self.requests.request_abort(rid, index)

    def has_work(self) -> bool:
        grammars = self.results.grammars
        return (not self.requests.is_empty or self._inflight is not None
                or (grammars is not None and grammars.has_parked))

    def fail_all(self, error: str) -> list[SequenceDelta]:
        """After a step raised: drop its results and end every request with ``error``."""
        self._inflight = None
        parked = self.results.grammars.fail_parked(error) if self.results.grammars else []
        return self.requests.abort_all(error) + parked

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[SequenceDelta]:
        """Receive aborts, schedule, launch, then process the previous step's result while this
        one runs (overlap); without overlap a step's result is processed before the next plan."""
        deltas = self.requests.apply_aborts()
        grammars = self.results.grammars
        if grammars is not None and grammars.has_parked:  # grammars that finished compiling
            ready, failed = grammars.take_ready(
                idle=self.requests.is_empty and self._inflight is None)
            deltas += failed
            for p in ready:
                self.requests.add(p.rid, p.input_ids, p.params, p.namespace)
        self.memory.poll()  # host-tier copies that finished make their prefixes usable
        prev, self._inflight = self._inflight, None
        if prev is not None:
            self.results.advance_early(prev)  # grammars advance while this step is planned
        plan = self._plan_continuation(prev) if prev is not None else None
        if prev is not None and plan is None:  # this plan needs prev's tokens on the host
            deltas += self.results.complete(prev)
            prev = None
        self.overlapped_steps += plan is not None
        work, feeds = plan if plan is not None else (self._schedule(deltas), None)
        flight = self._launch(work, feeds, prev) if work else None
        if prev is not None:
            deltas += self.results.complete(prev)  # read while the step just launched runs
        if flight is not None:
            self.results.draw(flight)  # a grammar step's masks need prev's tokens: now
        if flight is not None and not self.config.overlap:
            deltas += self.results.complete(flight)
            flight = None
        self._inflight = flight
        self._debug_check()
        return deltas

    def _plan_continuation(self, prev: InFlight) -> overlap.Plan | None:
        return overlap.plan_continuation(
            prev, self.requests, self.memory,
            lambda work, skip: self._plan_prefill(work, None, skip), self.max_context_len,
        )

    def _launch(self, work: Work, feeds: dict[int, int] | None, prev: InFlight | None) -> InFlight:
        batch = step_builder.build(
            work, self.runner.page_table, pending=feeds,
            pending_tokens=prev.pending.tokens if prev is not None and prev.pending else None,
            cascade=self.runner.cascade,
        )
        logits = self.runner.forward(batch.forward)
        return self.results.launch(work, batch, logits)

    def _debug_check(self) -> None:
        if self.config.debug_invariants:
            self.memory.check_invariants(self.requests.running)

    # ---- planning ----------------------------------------------------------------------
    def _schedule(self, deltas: list[SequenceDelta]) -> Work:
        work: Work = []
        # 1. Decode: one slot each for the newest token, oldest requests first.
        for seq in self.requests.decoding():
            if seq.status is not SeqStatus.RUNNING:
                continue  # retracted as a victim in this loop
            if self._make_room(seq, seq.kv_len + 1, deltas):
                work.append((seq, 1))
        work = [(s, n) for s, n in work if s.status is SeqStatus.RUNNING]
        self._plan_prefill(work, deltas)
        return work

    def _plan_prefill(self, work: Work, deltas: list[SequenceDelta] | None,
                      skip: frozenset[int] = frozenset()) -> None:
        """Continue chunked prompts, then admit waiting requests by policy, under the budget.

        ``deltas`` None: never end or retract a request here (the overlapped path); ``skip``:
        ids of sequences whose newest token is still on the device.
        """
        budget = PrefillBudget(self.config.max_prefill_tokens, self.config.chunked_prefill_size,
                               self.page_size)
        for seq in self.requests.prefilling(skip):
            if seq.status is not SeqStatus.RUNNING:
                continue  # retracted to make room for an older prompt in this loop
            n = budget.peek(seq.num_to_compute, seq.kv_len)
            if n == 0:
                break
            # Short of pages and nothing else runs this step: only retraction can free pages
            # (two half-done prompts holding each other's room would otherwise wait forever).
            if not self.memory.grow(seq, seq.kv_len + n) and (
                deltas is None or work or not self._make_room(seq, seq.kv_len + n, deltas)
            ):
                break
            budget.take(n)
            work.append((seq, n))
        if self.requests.waiting and not budget.exhausted:
            self._admit(budget, work)

    def _admit(self, budget: PrefillBudget, work: Work) -> None:
        running = self.requests.running
        if len(running) >= self.config.max_running_requests:
            return  # no room for anyone: skip ordering the queue at all
        admitted = InBatchPrefixes(self.page_size)
        use_cache = self.config.enable_prefix_cache
        # What the running sequences are still owed (the rest of each prompt, a share of each
        # remaining output), kept as a running sum: admission may visit many requests a step.
        owed_pages, owed_tokens = 0, 0.0
        for seq in running:
            owed_pages += self._prompt_pages_left(seq)
            owed_tokens += self._output_share(seq)
        for seq in self.requests.ordered_waiting():
            # n > 1 samples fork after prefill: count them all against the running cap.
            if len(running) + seq.num_forks > self.config.max_running_requests:
                return
            if budget.exhausted:
                return
            share = self._output_share(seq)
            reserve = owed_pages + int(-(-(owed_tokens + share) // self.page_size)) if running else 0
            # A host-tier load starts only for what admission can take within about a step.
            room = LoadRoom(max(0, self.memory.available_pages - reserve),
                            max(0, budget.remaining) + self.config.max_prefill_tokens,
                            max(0, self.config.max_running_requests - len(running)))
            if use_cache and not self.memory.prefix_ready(seq, seq.prefix_cap(), room):
                continue  # its prefix is loading from the host tier: the others go on
            matched = self.memory.attach_prefix(seq, max_tokens=seq.prefix_cap())
            if use_cache and admitted.shares_stem(seq):
                # Its stem is being computed this step by another request: wait for the hit.
                self.memory.release(seq, keep_in_cache=False)
                seq.kv_len = 0
                continue
            n = budget.peek(seq.num_to_compute, seq.kv_len)
            # Admit only if the whole rest of the prompt fits (not just this chunk), next to
            # what the running sequences (and this one's output) are still owed.
            need = self._pages(seq.num_tokens) - seq.pages.num_pages
            if n == 0 or self.memory.available_pages - need < reserve or not self.memory.grow(
                seq, seq.kv_len + n
            ):
                self.memory.release(seq, keep_in_cache=False)
                seq.kv_len = 0
                return
            budget.take(n)
            if use_cache:
                admitted.add(seq)
            if seq.params.prompt_logprobs and seq.prompt_logprobs is None:
                # Entry k scores prompt token k; tokens up to the cached prefix are not scored
                # (the first token never is: nothing precedes it).
                seq.prompt_logprobs = [None] * (seq.kv_len + 1)
                if seq.params.prompt_top_logprobs:
                    seq.prompt_top_logprobs = [None] * (seq.kv_len + 1)
            self.requests.admit(seq, matched)
            owed_pages += self._prompt_pages_left(seq)
            owed_tokens += share
            work.append((seq, n))

    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _prompt_pages_left(self, seq: Sequence) -> int:
        return max(0, self._pages(seq.num_tokens) - seq.pages.num_pages)

    @staticmethod
    def _output_share(seq: Sequence) -> float:
        left = min(seq.params.max_new_tokens - len(seq.output_ids), DECODE_RESERVE_CAP)
        return max(1.0, left * DECODE_RESERVE_RATIO) * seq.num_forks

    def _make_room(self, seq: Sequence, tokens: int, deltas: list[SequenceDelta]) -> bool:
        """Give ``seq`` slots for ``tokens`` tokens, retracting the newest running sequences
        while short (nano-vllm / SGLang order). When ``seq`` is itself the newest it is the one
        retracted (False: it resumes later); when it is alone and still short, it can never
        fit and is ended (False)."""
        while not self.memory.grow(seq, tokens):
            victim = self.requests.newest_running()
            assert victim is not None, f"{seq.rid}/{seq.index} asks for room but is not running"
            if victim is seq and len(self.requests.running) == 1:
                deltas.append(self.requests.finish(seq, "abort", OUT_OF_MEMORY))
                return False
            self.requests.retract(victim)
            if victim is seq:
                return False
        return True

    # ---- introspection -----------------------------------------------------------------
    def stats(self) -> EngineStats:
        cache = self.memory.cache.stats()
        in_tree = self.memory.cache.evictable_pages + self.memory.cache.locked_pages
        private = self.memory.allocator.num_used - in_tree
        running = self.requests.running
        return EngineStats(
            running_requests=len(running), queued_requests=len(self.requests.waiting),
            total_pages=self.memory.allocator.num_total, free_pages=self.memory.allocator.num_free,
            evictable_pages=cache.evictable_pages, locked_pages=cache.locked_pages,
            private_pages=private, wasted_slots=sum(s.pages.wasted_slots for s in running),
            cached_tokens=cache.cached_tokens, hit_tokens=self.requests.cached_prompt_tokens,
            query_tokens=self.requests.prompt_tokens, evictions=cache.evictions,
            retractions=self.requests.retractions, prompt_tokens_total=self.requests.prompt_tokens,
            generated_tokens_total=self.results.generated_tokens,
            extra={"held_page_refs": float(sum(s.pages.num_pages for s in running)),
                   "overlapped_steps": float(self.overlapped_steps),
                   **{forward_steps_key(path): float(n)
                      for path, n in self.runner.forward_steps.items()},
                   **self.memory.tier_stats()},
        )

    def flush_cache(self) -> bool:
        """Drop every unlocked cache entry (only allowed when idle, as SGLang does)."""
        if not self.requests.is_empty or self._inflight is not None:
            return False
        return self.memory.flush_cache()
