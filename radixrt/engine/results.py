"""After a forward step, in two halves so the host can run ahead of the device:

    launch    (no host sync) advance KV lengths, share finished chunks, fork n > 1 requests,
              queue the draw on the device -> InFlight
    complete  (one sync) read the tokens, apply stop rules, emit deltas

With overlap on, the scheduler launches step N+1 between the two halves of step N. A step with
grammar-constrained rows defers its draw (``draw``) until step N's tokens have been read and
have advanced the grammars: the masks for N+1 are filled on the host while N+1's forward runs
on the device, and the draw is queued right behind it. This module
owns no sequence state: it advances what a step computed and asks the request table for every
transition (fork, finish).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from radixrt.constrained.sequences import SequenceGrammars

if TYPE_CHECKING:
    from radixrt.constrained.advance import ArrivingAdvance
    from radixrt.constrained.batch import PendingMask
from radixrt.engine.memory import SequenceMemory
from radixrt.engine.outputs import SequenceDelta
from radixrt.engine.request import SeqStatus, Sequence
from radixrt.engine.requests import RequestTable
from radixrt.engine.sampler import PendingSample, Sampler, SamplerRow
from radixrt.engine.step_builder import StepBatch

Work = list[tuple[Sequence, int]]  # (sequence, tokens it computes this step)


@dataclass
class InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    sampled: list[Sequence]  # in draw order; row i of pending.tokens belongs to sampled[i]
    pending: PendingSample | None
    # A draw waiting for its grammar masks: the picked logits [B, V] and the sampler rows.
    deferred: tuple[torch.Tensor, list[SamplerRow]] | None = None
    constrained: bool = False  # some row has a grammar: its tokens advance the matchers
    mask: PendingMask | None = None  # the deferred draw's masks, being filled
    mask_started: bool = False
    drawn_mask: PendingMask | None = None  # the masks the draw used (to check its tokens)
    done: list[SequenceDelta] = field(default_factory=list)  # prefill-only ends, drawn nothing
    # Ids of sequences that jumped forward after this draw was queued: their sampled token
    # belongs to the position the forced run now fills, so it is dropped.
    dropped: frozenset[int] = frozenset()
    # Advanced early (``advance_early``): the running rows, and their advance on the way.
    early: tuple[list[int], ArrivingAdvance] | None = None


def will_hit_length(seq: Sequence, extra: int, max_context_len: int) -> bool:
    """Whether the sequence is done by length once ``extra`` more tokens are appended."""
    n_out = len(seq.output_ids) + extra
    return n_out >= seq.params.max_new_tokens or seq.num_tokens + extra >= max_context_len


class StepResults:
    def __init__(self, table: RequestTable, memory: SequenceMemory, sampler: Sampler, *,
                 eos_token_ids: Iterable[int], max_context_len: int,
                 grammars: SequenceGrammars | None = None) -> None:
        self.table = table
        self.grammars = grammars
        self.memory = memory
        self.sampler = sampler
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context_len = max_context_len
        self.generated_tokens = 0
        self._next_draw: InFlight | None = None  # the newest launched step with a deferred draw
        self._early: InFlight | None = None  # the step whose grammar advance is in flight

    def launch(self, work: Work, batch: StepBatch, logits: torch.Tensor) -> InFlight:
        """``logits``: [rows, vocab] float32 of the step just queued."""
        to_sample: list[Sequence] = []
        rows: list[int] = []
        done: list[SequenceDelta] = []
        for (seq, n), item in zip(work, batch.items):
            was_prefill = seq.in_prefill
            seq.kv_len += n
            if item.prompt_lp_rows:
                assert seq.prompt_logprobs is not None, "prompt-logprob rows for a sequence not asking"
                lps, tops = self.sampler.prompt_logprobs(
                    logits[item.prompt_lp_rows],
                    torch.tensor(item.prompt_lp_targets, device=logits.device),
                    seq.params.prompt_top_logprobs,
                )
                seq.prompt_logprobs.extend(lps)
                if seq.prompt_top_logprobs is not None:
                    seq.prompt_top_logprobs.extend(tops)
            if was_prefill:
                self.memory.commit_progress(seq)  # share the chunk with concurrent requests
            if item.sample_row is None:
                continue
            if seq.params.max_new_tokens == 0:  # prefill only: the prompt is cached, no draw
                done.extend(self.table.finish(s, "length") for s in [*self.table.fork(seq), seq])
                continue
            for child in self.table.fork(seq):
                to_sample.append(child)
                rows.append(item.sample_row)
            to_sample.append(seq)
            rows.append(item.sample_row)
        if not to_sample:
            return InFlight([], None, done=done)
        picked = logits if rows == list(range(logits.shape[0])) else logits[rows]
        sampler_rows = [SamplerRow(s.params, s.generator, s.prompt_ids, s.output_ids,
                                   self._banned(s)) for s in to_sample]
        if self.grammars is not None and self.grammars.needs_masks(to_sample):
            flight = InFlight(to_sample, None, deferred=(picked, sampler_rows), constrained=True,
                              done=done)
            self._next_draw = flight
            if self._early is not None and self.grammars.fill_ahead:
                # Grammar process: this step's masks start now, behind the advance in flight.
                from radixrt.constrained.advance import start_ahead

                started, mask = start_ahead(self.grammars, to_sample)
                if started:
                    flight.mask, flight.mask_started = mask, True
            return flight
        return InFlight(to_sample, self.sampler.draw(picked, sampler_rows), done=done)

    def _banned(self, seq: Sequence) -> tuple[int, ...]:
        """What the next draw may not pick: the stop tokens, until min_new_tokens are out."""
        p = seq.params
        if len(seq.output_ids) >= p.min_new_tokens:
            return ()
        return (*p.stop_token_ids, *(() if p.ignore_eos else self.eos_token_ids))

    def draw(self, flight: InFlight) -> None:
        """Queue a deferred draw: grammar masks from every row's newest state (the previous
        step's tokens must have been read: ``complete`` of it comes first)."""
        if flight.deferred is None:
            return
        assert self.grammars is not None, "only grammar rows defer their draw"
        picked, rows = flight.deferred
        if not flight.mask_started:
            self._start_masks(flight)
        bitmask = self.grammars.finish_bitmask(flight.mask)
        flight.drawn_mask = flight.mask
        flight.pending, flight.deferred, flight.mask = self.sampler.draw(picked, rows, bitmask), \
            None, None
        if self._next_draw is flight:
            self._next_draw = None
        if self.grammars.jump_forward_enabled:
            live = [s.status is SeqStatus.RUNNING for s in flight.sampled]
            jumps = self.grammars.jump_forward(flight.sampled, live, self.max_context_len)
            for seq in flight.sampled:
                forced = jumps.get(id(seq))
                if forced:
                    seq.output_ids.extend(forced)
                    self.generated_tokens += len(forced)
            flight.dropped = frozenset(jumps)

    def _start_masks(self, flight: InFlight) -> None:
        assert self.grammars is not None and not flight.mask_started, "masks start once"
        live = [s.status is SeqStatus.RUNNING for s in flight.sampled]
        flight.mask = self.grammars.start_bitmask(flight.sampled, live)
        flight.mask_started = True

    def _live_rows(self, flight: InFlight) -> tuple[list[int], list[int]]:
        """(rows whose token is appended, rows that jumped forward): finished or aborted
        while the step ran, a row's extra token is dropped."""
        rows = [i for i, seq in enumerate(flight.sampled) if seq.status is SeqStatus.RUNNING]
        if not flight.dropped:
            return rows, []
        return ([i for i in rows if id(flight.sampled[i]) not in flight.dropped],
                [i for i in rows if id(flight.sampled[i]) in flight.dropped])

    def advance_early(self, flight: InFlight) -> None:
        """At the start of a step, before the next one is planned: start a constrained step's
        grammar advance on the fill threads now (fused path), so it runs while this step is
        planned and launched; they wait for the tokens to land if they are not on the host
        yet (``grammars.wait_for_tokens``; else only if they are). ``complete`` then reads
        the verdicts and fills the next masks behind the advance."""
        g = self.grammars
        if g is None or not flight.constrained or flight.pending is None or \
                flight.early is not None or not g.masks.fused or \
                not (g.wait_for_tokens or flight.pending.ready()):
            return
        rows, _ = self._live_rows(flight)
        flight.early = (rows, g.advance_on_arrival([flight.sampled[i] for i in rows], rows,
                                                   flight.drawn_mask, flight.pending.host_tokens))
        flight.drawn_mask = None
        self._early = flight

    def complete(self, flight: InFlight) -> list[SequenceDelta]:
        if self._early is flight:
            self._early = None
        deltas: list[SequenceDelta] = list(flight.done)
        self.draw(flight)
        if flight.pending is None:
            return deltas
        out = flight.pending.resolve()
        rows, jumped = self._live_rows(flight)
        # Jumped rows: their forced run is appended already; report it, drop the draw.
        deltas.extend(flight.sampled[i].take_delta() for i in jumped)
        oks: list[bool] | None = None
        nxt = self._next_draw
        # The step launched behind this one draws next: once this step's tokens advance the
        # grammars, its masks can fill (off the GIL) while the stop rules below append the
        # tokens. A row those rules end is filled for nothing; its token is dropped anyway.
        fill_next = nxt is not None and nxt is not flight and not nxt.mask_started
        if self.grammars is not None and flight.early is not None:
            assert flight.early[0] == rows, "rows changed since advance_early"
            oks = flight.early[1].settle(out.token_ids)
            if fill_next and nxt is not None:
                nxt.mask = self.grammars.start_queued(
                    nxt.sampled, [s.status is SeqStatus.RUNNING for s in nxt.sampled])
                nxt.mask_started = True
        elif self.grammars is not None and (flight.constrained or fill_next):
            seqs = [flight.sampled[i] for i in rows] if flight.constrained else []
            nxt_seqs = nxt.sampled if fill_next and nxt is not None else None
            oks, mask = self.grammars.advance_and_start(
                seqs, [out.token_ids[i] for i in rows] if seqs else [], rows, flight.drawn_mask,
                nxt_seqs, None if nxt_seqs is None else
                [s.status is SeqStatus.RUNNING for s in nxt_seqs])
            flight.drawn_mask = None
            oks = oks if flight.constrained else None
            if nxt_seqs is not None and nxt is not None:
                nxt.mask, nxt.mask_started = mask, True
        for j, i in enumerate(rows):
            lp = out.logprobs[i] if out.logprobs is not None else None
            top = out.top_logprobs[i] if out.top_logprobs is not None else None
            deltas.append(self._append_token(flight.sampled[i], out.token_ids[i], lp, top,
                                             oks[j] if oks is not None else True))
        return deltas

    def _append_token(self, seq: Sequence, token: int, logprob: float | None,
                      top: list[tuple[int, float]] | None, grammar_ok: bool) -> SequenceDelta:
        params = seq.params
        self.generated_tokens += 1
        if not grammar_ok:
            return self.table.finish(seq, "abort", f"token {token} is outside the request's "
                                     f"{params.constraint[0] if params.constraint else 'grammar'}")
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            seq.matched_stop_token = token  # not part of the output, as in OpenAI's API
            return self.table.finish(seq, "stop")
        seq.output_ids.append(token)
        if logprob is not None and (params.logprobs or params.top_logprobs):
            seq.logprobs.append(logprob)
            if params.top_logprobs:
                seq.top_logprobs.append(top or [])
        if will_hit_length(seq, 0, self.max_context_len):
            return self.table.finish(seq, "length")
        return seq.take_delta()
