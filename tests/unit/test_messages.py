"""IPC messages: round trips, and decoding rejects unknown or malformed messages."""

from __future__ import annotations

import msgspec
import pytest

from radixrt.engine.outputs import EngineStats, SequenceDelta
from radixrt.sampling_params import SamplingParams
from radixrt.server import messages as m


def test_generate_request_round_trip_keeps_params() -> None:
    p = SamplingParams(max_new_tokens=7, temperature=0.0, n=3, seed=5, stop_token_ids=(9,))
    msg = m.GenerateReq("r1", [1, 2, 3], p, namespace="salt:a")
    out = m.decode_to_worker(m.encode(msg))
    assert isinstance(out, m.GenerateReq) and out == msg and out.params == p


def test_token_batch_round_trip_from_engine_objects() -> None:
    d = SequenceDelta("r", 1, [5, 6], 10, 8, 2, finished=True, finish_reason="length",
                      new_logprobs=[-0.5, -1.0], new_top_logprobs=[[(5, -0.5)], [(6, -1.0)]])
    s = EngineStats(1, 0, 64, 60, 2, 1, 1, 3, 8, 8, 10, 0, 0, 10, 2)
    batch = m.TokenBatch(0, 3, [m.delta_to_msg(d)], m.stats_to_msg(s))
    out = m.decode_to_router(m.encode(batch))
    assert isinstance(out, m.TokenBatch)
    assert out.deltas[0].new_token_ids == [5, 6] and out.deltas[0].finish_reason == "length"
    assert out.deltas[0].new_top_logprobs == [[(5, -0.5)], [(6, -1.0)]]
    assert out.stats is not None and out.stats.hit_rate == pytest.approx(0.8)


def test_unknown_message_type_is_rejected() -> None:
    evil = msgspec.msgpack.encode({"type": "RunShell", "cmd": "rm -rf /"})
    with pytest.raises(msgspec.ValidationError):
        m.decode_to_worker(evil)
    # A router-bound type is not accepted by the worker either (closed unions per direction).
    with pytest.raises(msgspec.ValidationError):
        m.decode_to_worker(m.encode(m.PongMsg(0, 1, m.stats_to_msg(
            EngineStats(0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)))))


def test_malformed_payloads_are_rejected() -> None:
    with pytest.raises(msgspec.ValidationError):  # missing field
        m.decode_to_worker(msgspec.msgpack.encode({"type": "AbortReq"}))
    with pytest.raises(msgspec.ValidationError):  # params fail SamplingParams validation
        m.decode_to_worker(msgspec.msgpack.encode(
            {"type": "GenerateReq", "rid": "x", "input_ids": [1], "params": {"top_p": 3.0}}))
    with pytest.raises(msgspec.DecodeError):
        m.decode_to_router(b"\xc1garbage")
