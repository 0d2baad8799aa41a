"""After a forward step, in two halves so the host can run ahead of the device:

    launch_results   (no host sync) advance KV lengths, share finished chunks, fork n > 1
                     requests, queue the draw on the device -> InFlight
    complete         (one sync) read the tokens, apply stop rules, emit deltas

With overlap on, the scheduler launches step N+1 between the two halves of step N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from radixrt.engine.outputs import SequenceDelta
from radixrt.engine.request import SeqStatus, Sequence
from radixrt.engine.sampler import PendingSample, SamplerRow
from radixrt.engine.step_builder import StepBatch

if TYPE_CHECKING:
    from radixrt.engine.scheduler import Scheduler


@dataclass
class InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    sampled: list[Sequence]  # in draw order; row i of pending.tokens belongs to sampled[i]
    pending: PendingSample | None


def launch_results(
    sched: Scheduler,
    work: list[tuple[Sequence, int]],
    batch: StepBatch,
    logits: torch.Tensor,  # [rows, vocab] float32
) -> InFlight:
    to_sample: list[Sequence] = []
    rows: list[int] = []
    for (seq, n), item in zip(work, batch.items):
        was_prefill = seq.in_prefill
        seq.kv_len += n
        if item.prompt_lp_rows:
            assert seq.prompt_logprobs is not None, "prompt-logprob rows for a sequence not asking"
            lps = sched.sampler.prompt_logprobs(
                logits[item.prompt_lp_rows],
                torch.tensor(item.prompt_lp_targets, device=logits.device),
            )
            seq.prompt_logprobs.extend(lps)
        if was_prefill:
            sched.memory.commit_progress(seq)  # share the chunk with concurrent requests
        if item.sample_row is None:
            continue
        for child in _fork(sched, seq):
            to_sample.append(child)
            rows.append(item.sample_row)
        to_sample.append(seq)
        rows.append(item.sample_row)
    if not to_sample:
        return InFlight([], None)
    picked = logits if rows == list(range(logits.shape[0])) else logits[rows]
    pending = sched.sampler.draw(
        picked, [SamplerRow(s.params, s.generator, s.prompt_ids, s.output_ids) for s in to_sample]
    )
    return InFlight(to_sample, pending)


def complete(sched: Scheduler, flight: InFlight, deltas: list[SequenceDelta]) -> None:
    if flight.pending is None:
        return
    out = flight.pending.resolve()
    for i, seq in enumerate(flight.sampled):
        if seq.status is not SeqStatus.RUNNING:
            continue  # finished or aborted while this step ran: its extra token is dropped
        lp = out.logprobs[i] if out.logprobs is not None else None
        top = out.top_logprobs[i] if out.top_logprobs is not None else None
        _append_token(sched, seq, out.token_ids[i], lp, top, deltas)


def _fork(sched: Scheduler, parent: Sequence) -> list[Sequence]:
    """Split an n > 1 request after its prompt is prefilled; returns children that share its KV."""
    if parent.num_forks <= 1:
        return []
    children: list[Sequence] = []
    for index in range(1, parent.num_forks):
        child = sched._new_sequence(
            parent.rid, index, parent.prompt_ids, parent.params, parent.namespace
        )
        child.cached_tokens = parent.cached_tokens
        if parent.prompt_logprobs is not None:
            child.prompt_logprobs = list(parent.prompt_logprobs)
        sched._by_rid[parent.rid].append(child)
        if sched.memory.fork(parent, child):
            child.status = SeqStatus.RUNNING
            sched.running.append(child)
            children.append(child)
        else:
            sched.waiting.append(child)  # no page for its copy now: it resumes on a cache hit
    parent.num_forks = 1
    return children


def _append_token(
    sched: Scheduler,
    seq: Sequence,
    token: int,
    logprob: float | None,
    top: list[tuple[int, float]] | None,
    deltas: list[SequenceDelta],
) -> None:
    params = seq.params
    sched.generated_tokens_total += 1
    if (token in sched.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
        seq.matched_stop_token = token  # not part of the output, as in OpenAI's API
        sched._finish(seq, "stop", deltas)
        return
    seq.output_ids.append(token)
    if logprob is not None and (params.logprobs or params.top_logprobs):
        seq.logprobs.append(logprob)
        if params.top_logprobs:
            seq.top_logprobs.append(top or [])
    if will_hit_length(sched, seq, 0):
        sched._finish(seq, "length", deltas)
    else:
        deltas.append(sched.make_delta(seq))


def will_hit_length(sched: Scheduler, seq: Sequence, extra: int) -> bool:
    """Whether the sequence is done by length once ``extra`` more tokens are appended."""
    n_out = len(seq.output_ids) + extra
    return n_out >= seq.params.max_new_tokens or seq.num_tokens + extra >= sched.max_context_len
