"""Typed, tagged IPC messages between the router and its workers (msgspec msgpack, never pickle).

Every message is a ``msgspec.Struct`` with ``tag=True``: the encoded map carries a ``type`` field
naming the struct, and decoding against the closed union of one direction's messages rejects any
other tag, any missing field and any mistyped field (``msgspec.ValidationError``). Token ids
travel, never text: the worker does not own a tokenizer.

Direction router -> worker: GenerateReq, AbortReq, PingReq, FlushCacheReq, ShutdownReq.
Direction worker -> router: ReadyMsg, TokenBatch, PongMsg, FlushCacheResp, RequestError,
WorkerFatal.
"""

from __future__ import annotations

import msgspec

from radixrt.engine.outputs import EngineStats, SequenceDelta
from radixrt.sampling_params import SamplingParams

# ---------------------------------------------------------------------------- router -> worker


class GenerateReq(msgspec.Struct, tag=True, frozen=True):
    rid: str
    input_ids: list[int]
    # A frozen dataclass: msgspec decodes it field by field and runs its __post_init__, so a
    # malformed params map is rejected by the same validation as in-process use.
    params: SamplingParams
    namespace: str | None = None


class AbortReq(msgspec.Struct, tag=True, frozen=True):
    rid: str
    index: int | None = None  # one sample of an n > 1 request; None = all of them


class PingReq(msgspec.Struct, tag=True, frozen=True):
    seq: int


class FlushCacheReq(msgspec.Struct, tag=True, frozen=True):
    seq: int


class ShutdownReq(msgspec.Struct, tag=True, frozen=True):
    reason: str = ""


# ---------------------------------------------------------------------------- worker -> router


# EngineStats is itself a msgspec Struct: it crosses the wire as it is.
StatsMsg = EngineStats


class DeltaMsg(msgspec.Struct, frozen=True, array_like=True):
    """SequenceDelta on the wire; array_like keeps the per-step batches compact."""

    rid: str
    index: int
    new_token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    matched_stop_token: int | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


class ReadyMsg(msgspec.Struct, tag=True, frozen=True):
    worker_id: int
    pid: int
    model_name: str
    model_path: str | None
    vocab_size: int
    max_context_len: int
    eos_token_ids: list[int]
    page_size: int


class TokenBatch(msgspec.Struct, tag=True, frozen=True):
    """Every sequence's new tokens of one worker step (one message per step, not per token)."""

    worker_id: int
    step: int
    deltas: list[DeltaMsg]
    stats: StatsMsg | None = None  # attached when a request finished or the worker went idle


class PongMsg(msgspec.Struct, tag=True, frozen=True):
    worker_id: int
    seq: int
    stats: StatsMsg


class FlushCacheResp(msgspec.Struct, tag=True, frozen=True):
    worker_id: int
    seq: int
    ok: bool


class RequestError(msgspec.Struct, tag=True, frozen=True):
    """The engine refused a request (e.g. ValueError from add_request); nothing was allocated."""

    worker_id: int
    rid: str
    message: str


class WorkerFatal(msgspec.Struct, tag=True, frozen=True):
    """The worker hit an error it cannot recover from and is exiting (the router restarts it)."""

    worker_id: int
    message: str
    pid: int = 0  # tells an old incarnation's last words from the current worker's


ToWorker = GenerateReq | AbortReq | PingReq | FlushCacheReq | ShutdownReq
ToRouter = ReadyMsg | TokenBatch | PongMsg | FlushCacheResp | RequestError | WorkerFatal

_encoder = msgspec.msgpack.Encoder()
_to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
_to_router_decoder = msgspec.msgpack.Decoder(ToRouter)


def encode(msg: ToWorker | ToRouter) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    """Raises msgspec.ValidationError / DecodeError for unknown tags or malformed payloads."""
    return _to_worker_decoder.decode(data)


def decode_to_router(data: bytes) -> ToRouter:
    """Raises msgspec.ValidationError / DecodeError for unknown tags or malformed payloads."""
    return _to_router_decoder.decode(data)


# ---------------------------------------------------------------------------- conversions


def stats_to_msg(s: EngineStats) -> StatsMsg:
    """Stats for the wire: the same Struct, with ``extra`` normalized to str -> float."""
    return msgspec.structs.replace(s, extra={str(k): float(v) for k, v in s.extra.items()})


def delta_to_msg(d: SequenceDelta) -> DeltaMsg:
    top = d.new_top_logprobs
    return DeltaMsg(
        rid=d.rid,
        index=d.index,
        new_token_ids=[int(t) for t in d.new_token_ids],
        prompt_tokens=d.prompt_tokens,
        cached_tokens=d.cached_tokens,
        completion_tokens=d.completion_tokens,
        finished=d.finished,
        finish_reason=d.finish_reason,
        error=d.error,
        new_logprobs=None if d.new_logprobs is None else [float(x) for x in d.new_logprobs],
        new_top_logprobs=None
        if top is None
        else [[(int(t), float(lp)) for t, lp in pos] for pos in top],
        prompt_logprobs=None
        if d.prompt_logprobs is None
        else [None if x is None else float(x) for x in d.prompt_logprobs],
        matched_stop_token=d.matched_stop_token,
        prompt_top_logprobs=None if d.prompt_top_logprobs is None else [
            None if pos is None else [(int(t), float(lp)) for t, lp in pos]
            for pos in d.prompt_top_logprobs],
    )
