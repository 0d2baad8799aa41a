"""The engine's side of structured generation: one matcher per constrained sequence, kept in
step with the sequence's output, and the step's bitmask from them.

Matchers live here, keyed weakly by sequence, not on the sequence itself: a sequence that
ends (finished, aborted, failed) drops its matcher with it, and nothing in the scheduler's
state transitions (fork, retraction, resume) has to know about grammars. A matcher is made
the first time a sequence is sampled and is re-synchronized with ``output_ids`` before every
mask: a fork of an n > 1 request (empty output) starts from the grammar's start; a sequence
whose output was cut back is rolled back; one that gained tokens elsewhere catches up.

Compilation starts when a request is added (``ready_or_park``), cached per grammar text, in a
thread pool. A grammar that compiles (or fails) within ``SYNC_COMPILE_WAIT_S`` is decided
there: a bad one is a ValueError, refused before anything is allocated. A slow one parks its
request here, outside the scheduler's queue, so a hostile schema that takes seconds never
holds up the step loop; ``take_ready`` hands parked requests over once compiled, or ends them
with an error delta (``GRAMMAR_ERROR_PREFIX``, a 400 in the router) after a failure or
``compile_timeout_s``.
"""

from __future__ import annotations

import functools
import os
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radixrt.engine.outputs import SequenceDelta
from radixrt.sampling_params import SamplingParams

if TYPE_CHECKING:
    # xgrammar is imported on the first grammar, not with the engine: a deployment without it
    # still serves everything else, and refuses grammars with a message.
    from radixrt.constrained.advance import ArrivingAdvance
    from radixrt.constrained.batch import MaskBuilder, PendingMask
    from radixrt.constrained.grammar import GrammarCompiler
    from radixrt.constrained.matcher import Matcher
    from radixrt.constrained.proc_masks import ProcessMasks
    from radixrt.engine.request import Sequence as Seq

DEFAULT_COMPILE_TIMEOUT_S = 10.0
JUMP_FORWARD_ENV = "RADIXRT_GRAMMAR_JUMP_FORWARD"
# 1 (default): a step's grammar advance starts before its tokens are on the host, the fill
# threads waiting for them; 0: only once they are (``StepResults.advance_early``).
WAIT_TOKENS_ENV = "RADIXRT_GRAMMAR_WAIT_TOKENS"
# 1: each fill thread's matchers use a private copy of the compiled grammar (a measurement
# knob: whether threads sharing one grammar object slow each other's accepts down).
SHARD_COPIES_ENV = "RADIXRT_GRAMMAR_SHARD_COPIES"
# auto (default: off, see use_process), 1, 0: the per-step grammar work in a process of
# its own (proc_masks.py), off the scheduler's GIL.
PROCESS_ENV = "RADIXRT_GRAMMAR_PROCESS"
SYNC_COMPILE_WAIT_S = 0.05
# Errors that are the client's grammar, not the engine's fault: the router answers 400.
GRAMMAR_ERROR_PREFIX = "invalid grammar: "


def use_process(device: torch.device | str) -> bool:
    """RADIXRT_GRAMMAR_PROCESS for ``device``; ValueError on a value it does not know."""
    raw = os.environ.get(PROCESS_ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        # Off: on the H200 (session 6, two calls) the in-process fused fill was 1.03-1.06x the
        # unconstrained step and the process 1.23-1.32x (bench/RESULTS.md).
        return False
    if raw not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(f"{PROCESS_ENV} must be auto, 1 or 0, got {raw!r}")
    return raw in ("1", "true", "yes", "on")


@dataclass
class Parked:
    """A request whose grammar is still compiling."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    namespace: str | None
    future: Future[Any]
    since: float


class SequenceGrammars:
    def __init__(self, tokenizer: Any, vocab_size: int, device: torch.device | str,
                 stop_token_ids: Iterable[int], *,
                 compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
                 fill_threads: int | None = None, fused: bool | None = None,
                 process: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.compile_timeout_s = compile_timeout_s
        self._compiler: GrammarCompiler | None = None  # built on the first grammar
        self._masks: MaskBuilder | ProcessMasks | None = None
        self._matchers: weakref.WeakKeyDictionary[Seq, Matcher] = weakref.WeakKeyDictionary()
        self._parked: dict[str, Parked] = {}
        self._next_shard = 0
        # Matchers the last advance_and_start is advancing on the fill threads, by seq id.
        self._advancing: dict[int, Matcher] = {}
        self.rejected_tokens = 0
        # Fill threads and path (batch.py); None: RADIXRT_GRAMMAR_THREADS / _FUSED or defaults.
        self.fill_threads: int | None = fill_threads
        self.fused: bool | None = fused
        # The grammar process (proc_masks.py); None: RADIXRT_GRAMMAR_PROCESS (checked here).
        self.process: bool = use_process(self.device) if process is None else process
        # Process path: a step's masks start at its launch, behind the advance in flight
        # (advance.start_ahead); 0: once the tokens ahead of it are counted.
        self.fill_ahead = os.environ.get("RADIXRT_GRAMMAR_FILL_AHEAD", "1") != "0"
        # Jump-forward (off by default: see ``jump_forward``); counts for benchmarks / tests.
        self.jump_forward_enabled = os.environ.get(JUMP_FORWARD_ENV, "0") == "1"
        self.wait_for_tokens = os.environ.get(WAIT_TOKENS_ENV, "1") != "0"
        self.shard_copies = os.environ.get(SHARD_COPIES_ENV, "0") == "1"
        self.jumps = 0
        self.jump_tokens = 0

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            assert self.tokenizer is not None, "check() refuses grammars without a tokenizer"
            from radixrt.constrained.grammar import GrammarCompiler, tokenizer_info

            # The grammar ends on the engine's stop tokens, not only the tokenizer's eos.
            info = tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids)
            self._compiler = GrammarCompiler(info, timeout_s=self.compile_timeout_s)
        return self._compiler

    def _submit(self, params: SamplingParams) -> Future[Any]:
        assert params.constraint is not None, "only constrained requests compile"
        kind, _ = params.constraint
        if self.tokenizer is None:
            raise ValueError(f"{kind} needs a tokenizer, and this model has none")
        try:
            import xgrammar  # noqa: F401
        except ImportError:
            raise ValueError(f"{kind} needs the xgrammar package, which is not installed") from None
        return self.compiler.submit(params.constraint)

    def check(self, params: SamplingParams) -> None:
        """Compile the request's grammar now, blocking (cached); ValueError if it cannot be
        served. For callers that can wait (benchmarks); the scheduler uses ready_or_park."""
        if params.constraint is not None:
            self._raise_if_failed(self._submit(params), self.compile_timeout_s)

    def _raise_if_failed(self, fut: Future[Any], timeout: float) -> None:
        from radixrt.constrained.grammar import GrammarError

        try:
            fut.result(timeout=timeout)
        except GrammarError as e:
            raise ValueError(str(e)) from None

    def ready_or_park(self, rid: str, input_ids: list[int], params: SamplingParams,
                      namespace: str | None) -> bool:
        """True: the grammar is compiled, queue the request now. False: it is parked here until
        ``take_ready``. ValueError: the grammar is bad (nothing was queued)."""
        fut = self._submit(params)
        done, _ = wait([fut], timeout=SYNC_COMPILE_WAIT_S)
        if done:
            self._raise_if_failed(fut, 0)
            return True
        self._parked[rid] = Parked(rid, input_ids, params, namespace, fut, time.monotonic())
        return False

    @property
    def has_parked(self) -> bool:
        return bool(self._parked)

    def is_parked(self, rid: str) -> bool:
        return rid in self._parked

    def unpark(self, rid: str) -> bool:
        """Drop a parked request (aborted while compiling); False if it is not parked."""
        return self._parked.pop(rid, None) is not None

    def take_ready(self, idle: bool) -> tuple[list[Parked], list[SequenceDelta]]:
        """Parked requests whose grammar compiled, and error deltas for those whose grammar
        failed or overran the timeout. ``idle`` (nothing else to run): wait a few ms for a
        compilation instead of letting the step loop spin."""
        if idle and self._parked:
            wait([p.future for p in self._parked.values()], timeout=0.005,
                 return_when=FIRST_COMPLETED)
        ready: list[Parked] = []
        failed: list[SequenceDelta] = []
        now = time.monotonic()
        for rid, p in list(self._parked.items()):
            error = None
            if p.future.done():
                exc = p.future.exception()
                if exc is None:
                    ready.append(p)
                else:
                    error = str(exc)
            elif now - p.since > self.compile_timeout_s:
                assert p.params.constraint is not None
                error = f"{p.params.constraint[0]} did not compile within " \
                        f"{self.compile_timeout_s:g} s"
            if error is not None:
                failed.extend(self._error_deltas(p, GRAMMAR_ERROR_PREFIX + error))
            if p.future.done() or error is not None:
                del self._parked[rid]
        return ready, failed

    def fail_parked(self, error: str) -> list[SequenceDelta]:
        deltas = [d for p in self._parked.values() for d in self._error_deltas(p, error)]
        self._parked.clear()
        return deltas

    @staticmethod
    def _error_deltas(p: Parked, error: str) -> list[SequenceDelta]:
        return [SequenceDelta(rid=p.rid, index=i, new_token_ids=[],
                              prompt_tokens=len(p.input_ids), cached_tokens=0,
                              completion_tokens=0, finished=True, finish_reason="abort",
                              error=error)
                for i in range(p.params.n)]

    @staticmethod
    def needs_masks(seqs: Sequence[Seq]) -> bool:
        return any(s.params.constraint is not None for s in seqs)

    def matcher(self, seq: Seq, ahead: bool = False) -> Matcher | None:
        """The sequence's matcher, in step with its output; None if it is unconstrained.
        ``ahead``: it has accepted a token that is not appended to the output yet. The fill
        threads must be idle (``_drain``)."""
        key = seq.params.constraint
        if key is None:
            return None
        m = self._matchers.get(seq)
        if m is None:
            from radixrt.constrained.matcher import Matcher

            shard = self._next_shard
            # A copy of the grammar per fill thread (off by default; see compile_copy).
            compiled = self.compiler.compile_copy(key, shard % self.masks.threads) \
                if self.shard_copies and self.masks.fused and not self.masks.lazy else self.compiler.compile(key)
            m = Matcher(compiled, shard=shard, lazy=self.masks.lazy)
            self._next_shard += 1  # round-robin: each fill thread gets a fair share of rows
            self._matchers[seq] = m
        out = seq.output_ids
        n = len(out) + ahead
        if m.num_accepted != n:  # in step already on the hot path: no slice
            if m.num_accepted > n:
                m.rollback(m.num_accepted - n)  # output cut back (e.g. a retraction)
            for t in out[m.num_accepted:]:  # tokens appended without us (none, in the engine)
                m.advance(t)
        return m

    @property
    def masks(self) -> MaskBuilder | ProcessMasks:
        if self._masks is None:
            if self.process and self.fused is not False:
                from radixrt.constrained.proc_masks import ProcessMasks

                self._masks = ProcessMasks(self.vocab_size, self.device, self.compiler.info,
                                           self.fill_threads)
            else:
                from radixrt.constrained.batch import MaskBuilder

                self._masks = MaskBuilder(self.vocab_size, self.device, self.fill_threads,
                                          self.fused)
        return self._masks

    def close(self) -> None:
        """Stop the grammar process (if any) and the fill threads; safe to call twice."""
        if self._masks is not None:
            self._masks.close()
            self._masks = None

    def _drain(self) -> None:
        if self._masks is not None:
            self._masks.drain()
        self._advancing = {}

    def bitmask(self, seqs: Sequence[Seq], live: Sequence[bool]) -> torch.Tensor | None:
        """[B, W] int32 on the device for a draw over ``seqs``; rows not ``live`` (ended while
        the step ran: their token is dropped) and unconstrained rows allow everything."""
        return self.finish_bitmask(self.start_bitmask(seqs, live))

    def start_bitmask(self, seqs: Sequence[Seq], live: Sequence[bool],
                      ahead: frozenset[int] = frozenset()) -> PendingMask | None:
        """``bitmask`` begun in the background: the matchers are synced here, the fill runs
        while the caller goes on; ``finish_bitmask`` waits. No sequence may be sampled
        (``accept_batch``) in between. ``ahead``: ids of sequences whose accepted token is
        not appended yet (``accept_batch`` returned them)."""
        self._drain()
        rows: list[Matcher | None] = []
        for seq, ok in zip(seqs, live):
            m = self.matcher(seq, id(seq) in ahead) if ok else None
            rows.append(None if m is None or m.done else m)
        return self.masks.start(rows)

    def finish_bitmask(self, pending: PendingMask | None) -> torch.Tensor | None:
        assert self._masks is not None or pending is None, "finish without a start"
        return self._masks.finish(pending) if self._masks is not None else None

    def accept(self, seq: Seq, token: int) -> bool:
        """Advance the sequence's grammar by its newly sampled ``token``; False if the grammar
        does not allow it (never under the mask: the caller ends the sequence)."""
        return self.accept_batch([seq], [token])[0][0]

    def accept_batch(self, seqs: Sequence[Seq],
                     tokens: Sequence[int]) -> tuple[list[bool], frozenset[int]]:
        """``accept`` for a step's rows at once: one call into xgrammar for all constrained
        rows instead of a Python round trip each (unconstrained rows are True). Also the ids
        of the sequences now one token ahead of their output (accepted, not a stop token:
        the caller appends it; ``start_bitmask`` before that needs to know)."""
        self._drain()
        oks = [True] * len(seqs)
        ahead: list[int] = []
        for i, seq in enumerate(seqs):
            m = self.matcher(seq)
            if m is None:
                continue
            # One accept_token per row on this thread (the unfused path; see batch.py).
            oks[i] = m.advance(int(tokens[i]))
            if not oks[i]:
                self.rejected_tokens += 1  # nothing may follow, or outside the grammar
            elif not m.terminated:  # a stop token is accepted but never appended
                ahead.append(id(seq))
        return oks, frozenset(ahead)

    def advance_and_start(self, seqs: Sequence[Seq], tokens: Sequence[int],
                          mask_rows: Sequence[int], drawn: PendingMask | None,
                          nxt: Sequence[Seq] | None, nxt_live: Sequence[bool] | None,
                          ) -> tuple[list[bool], PendingMask | None]:
        """A step's tokens are on the host: advance the grammars by them and start the next
        step's mask (``nxt`` with ``nxt_live``, if given). The result is known here, before
        any grammar runs: ``tokens[j]`` was sampled under row ``mask_rows[j]`` of the
        ``drawn`` mask, so the grammar accepts it iff that row allows it; the advances and
        the fill then run on the fill threads (fused path) while the caller goes on. The
        unfused path advances here (``accept_batch``), then starts the fill."""
        masks = self.masks
        if not masks.fused:
            oks, ahead = self.accept_batch(seqs, tokens)
            pending = self.start_bitmask(nxt, nxt_live, ahead) if nxt is not None and \
                nxt_live is not None else None
            return oks, pending
        from radixrt.constrained.advance import advancing_rows, verdicts

        self._drain()
        oks, check = advancing_rows(self, seqs, mask_rows, drawn)
        accepts = verdicts(self, oks, check, [int(tokens[j]) for j, _ in check], mask_rows, drawn)
        self._advancing = {id(seqs[j]): m for j, m in check}
        rows: list[Matcher | None] = []
        if nxt is not None and nxt_live is not None:
            for seq, ok in zip(nxt, nxt_live):
                m = self.matcher(seq) if ok else None  # in step: its token is not appended yet
                rows.append(None if m is None or m.done else m)
        return oks, masks.advance_and_start(accepts, rows)  # it counts the accepts

    def advance_on_arrival(self, seqs: Sequence[Seq], mask_rows: Sequence[int],
                           drawn: PendingMask | None,
                           host_tokens: Callable[[], np.ndarray]) -> ArrivingAdvance:
        """Fused path, before a step's tokens are on the host: the fill threads wait for them
        (``host_tokens``, all rows of the draw; ``seqs[j]``'s token is row ``mask_rows[j]``)
        and advance the matchers the moment they land, while this thread plans and launches
        the next step. ``ArrivingAdvance.settle`` then gives the verdicts, from the mask, once
        the caller has read the tokens itself; ``start_queued`` fills behind the advance."""
        from radixrt.constrained.advance import ArrivingAdvance, advancing_rows, after_event

        self._drain()
        oks, check = advancing_rows(self, seqs, mask_rows, drawn)
        self._advancing = {id(seqs[j]): m for j, m in check}
        if self.device.type == "cuda":
            # Recorded right behind the draw's copy (the next forward is not queued yet): the
            # fill thread sleeps on it, where the copy's own event would have it spin on a
            # core the scheduler thread may share.
            landed = torch.cuda.Event(blocking=True)
            landed.record()
            host_tokens = functools.partial(after_event, landed, host_tokens)
        self.masks.advance_on_arrival([(m, mask_rows[j]) for j, m in check], host_tokens)
        return ArrivingAdvance(self, oks, check, mask_rows, drawn)

    def start_queued(self, seqs: Sequence[Seq], live: Sequence[bool]) -> PendingMask | None:
        """``start_bitmask`` (fused path) while the advances begun by the last
        ``advance_and_start`` may still run: their matchers are not read here (they are in
        step once their advance is done) and the fill runs behind it on the same threads."""
        rows: list[Matcher | None] = []
        advancing = self._advancing
        for seq, ok in zip(seqs, live):
            m = None
            if ok:  # (advancing holds constrained rows only: most skip params.constraint)
                m = advancing.get(id(seq))
                if m is None and seq.params.constraint is not None:
                    m = self.matcher(seq)
            rows.append(m)
        return self.masks.advance_and_start((), rows, queued=True)

    def jump_forward(self, seqs: Sequence[Seq], live: Sequence[bool],
                     max_context_len: int) -> dict[int, list[int]]:
        """Forced runs appended now, by sequence id (see ``jump.forced_runs``); {} when off."""
        if not self.jump_forward_enabled:
            return {}
        from radixrt.constrained.jump import forced_runs

        self._drain()
        return forced_runs(self, seqs, live, max_context_len)
