"""The codec: every message round-trips, and every kind of bad frame is refused cleanly."""

from __future__ import annotations

import msgpack
import pytest

from protocol import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    Delta,
    Error,
    Finished,
    Generate,
    Heartbeat,
    Output,
    ProtocolError,
    Ready,
    SamplingParams,
    ToolCall,
    decode,
    encode,
)

MESSAGES = [
    Ready("w1", "tiny", PROTOCOL_VERSION, 16, 8192, 1234),
    Ready("w2", "qwen", PROTOCOL_VERSION, 4, 32768, 99, tool_calls=True, thinking=True),
    Heartbeat("w1", active=3, queued=1),
    Generate(
        "r1",
        max_tokens=5,
        messages=[{"role": "user", "content": "hi"}],
        tools=[{"type": "function", "function": {"name": "f"}}],
        sampling=SamplingParams(temperature=0.2, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=-0.5,
                                frequency_penalty=1.25),
        stop=["\n\n"],
        chat_template_kwargs={"enable_thinking": False},
    ),
    Generate("r2", prompt="Once upon a time"),
    Cancel("r1"),
    Accepted("r1", 37),
    Output([Delta("r1", "Hel", token_count=1), Delta("r2", "lo ✓", token_count=2)]),
    Output([Delta("r3", reasoning="hmm", tool_calls=[ToolCall("call_1", "f", "{}")], token_count=1)]),
    Finished("r1", "length", prompt_tokens=37, completion_tokens=5, cached_tokens=3),
    Error("context_length_exceeded", "too long", "r1"),
    Error("internal_error", "worker-wide"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert decode(encode(message)) == message


def frame(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b"\xc1\x00garbage", "undecodable"),
        (msgpack.packb([1, 2, 3]), "not a map"),
        (frame(v=PROTOCOL_VERSION + 1, t="cancel", request_id="r"), "protocol version"),
        (frame(t="cancel", request_id="r"), "protocol version"),
        (frame(v=PROTOCOL_VERSION, t="launch_missiles"), "unknown message type"),
        (frame(v=PROTOCOL_VERSION, t="cancel"), "missing fields"),
        (frame(v=PROTOCOL_VERSION, t="cancel", request_id="r", extra=1), "unknown fields"),
        (frame(v=PROTOCOL_VERSION, t="cancel", request_id=7), "expected str"),
        (frame(v=PROTOCOL_VERSION, t="generate", request_id="r", max_tokens=True), "expected an integer"),
        (frame(v=PROTOCOL_VERSION, t="generate", request_id="r", sampling={"temperature": "hot"}), "expected a number"),
        (frame(v=PROTOCOL_VERSION, t="output", deltas=[{"text": "x"}]), "missing fields"),
        (frame(v=PROTOCOL_VERSION, t="output", deltas="nope"), "expected a list"),
        (frame(v=PROTOCOL_VERSION, t="generate", request_id="r", messages=["not a map"]), "expected a map"),
        (frame(v=PROTOCOL_VERSION, t="cancel", request_id=None), "expected str"),
        (frame(v=PROTOCOL_VERSION, t="finished", request_id="r", finish_reason="stop", prompt_tokens=1,
               completion_tokens=None), "expected an integer"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_frames_raise_protocol_error(bad, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(bad)


def test_integers_are_accepted_where_floats_are_expected():
    message = decode(frame(v=PROTOCOL_VERSION, t="generate", request_id="r", sampling={"temperature": 0}))
    assert message.sampling.temperature == 0.0 and isinstance(message.sampling.temperature, float)
