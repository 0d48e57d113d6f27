"""/v1/messages through the real gateway and a (scripted) worker, with the official anthropic SDK.

The worker is tests/scripted_worker.py on the tiny "qwen" model: "SCRIPT:<text>" in the last
user message makes the model write <text> (tool calls, thinking); everything else is sampled.
The SDK parses every reply and every stream event into its types.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import anthropic
import httpx
import pytest
from conftest import SCRIPTED
from processes import Stack

MODEL = SCRIPTED
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "claude-code"
NO_THINKING = {"type": "disabled"}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.fixture(scope="module")
def stack(scripted_stack: Stack) -> Stack:
    return scripted_stack


@pytest.fixture(scope="module")
def client(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60,
                               _strict_response_validation=True)


def create(client: anthropic.Anthropic, text: str, **kwargs):
    kwargs.setdefault("thinking", NO_THINKING)
    kwargs.setdefault("max_tokens", 64)
    return client.messages.create(model=MODEL, messages=[{"role": "user", "content": text}], **kwargs)


def test_create_and_stream_give_the_same_message(client):
    message = create(client, "SCRIPT:Hello from a local model.", system="Be brief.")
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_") and message.stop_reason == "end_turn"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Hello from a local model."
    assert message.usage.input_tokens > 5 and message.usage.output_tokens > 3
    with client.messages.stream(model=MODEL, max_tokens=64, thinking=NO_THINKING,
                                messages=[{"role": "user", "content": "SCRIPT:Hello from a local model."}]) as stream:
        events = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_delta" in events and "message_delta" in events
    assert streamed.content[0].text == message.content[0].text and streamed.stop_reason == "end_turn"
    assert streamed.usage.output_tokens == message.usage.output_tokens


def test_max_tokens_ends_with_max_tokens(client):
    message = create(client, "Tell me a long story", max_tokens=5, extra_body={"temperature": 0})
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 5


def test_stop_sequences_end_with_the_one_that_matched(client):
    message = create(client, "SCRIPT:one, two, three, four", stop_sequences=["four", "three"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "three"
    assert message.content[0].text == "one, two, "


def test_a_tool_round_trip_with_tool_result(client):
    script = f"SCRIPT:{WEATHER_CALL}|||It is sunny in Paris."
    messages = [{"role": "user", "content": script}]
    first = client.messages.create(model=MODEL, max_tokens=128, thinking=NO_THINKING, tools=[WEATHER_TOOL],
                                   messages=messages)
    assert first.stop_reason == "tool_use"
    call = first.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert call.id.startswith("toolu_")
    messages += [
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]},
    ]
    with client.messages.stream(model=MODEL, max_tokens=128, thinking=NO_THINKING, tools=[WEATHER_TOOL],
                                messages=messages) as stream:
        second = stream.get_final_message()
    assert second.stop_reason == "end_turn" and second.content[0].text == "It is sunny in Paris."
    # The second turn's prompt starts with the first one's: served from the prefix cache.
    assert second.usage.cache_read_input_tokens > first.usage.input_tokens // 2


def test_a_streamed_tool_call_arrives_as_input_json(client):
    with client.messages.stream(model=MODEL, max_tokens=128, thinking=NO_THINKING, tools=[WEATHER_TOOL],
                                messages=[{"role": "user", "content": f"SCRIPT:{WEATHER_CALL}"}]) as stream:
        deltas = [event.delta.type for event in stream if event.type == "content_block_delta"]
        message = stream.get_final_message()
    assert "input_json_delta" in deltas
    assert message.content[-1].input == {"city": "Paris"} and message.stop_reason == "tool_use"


def test_thinking_comes_back_as_a_thinking_block_with_a_signature(client):
    message = create(client, "SCRIPT:Let me think.</think>The answer is 4.", thinking={"type": "enabled",
                                                                                      "budget_tokens": 1024})
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Let me think." and message.content[0].signature
    assert message.content[1].text == "The answer is 4."


def test_count_tokens_is_the_prompt_a_generation_uses(client):
    messages = [{"role": "user", "content": "How many tokens is this?"}]
    counted = client.messages.count_tokens(model=MODEL, messages=messages, thinking=NO_THINKING)
    made = client.messages.create(model=MODEL, max_tokens=1, messages=messages, thinking=NO_THINKING)
    total = made.usage.input_tokens + made.usage.cache_read_input_tokens
    assert counted.input_tokens == total > 5
    with_tool = client.messages.count_tokens(model=MODEL, messages=messages, thinking=NO_THINKING, tools=[WEATHER_TOOL])
    assert with_tool.input_tokens > counted.input_tokens


@pytest.mark.parametrize(
    "body, status, kind",
    [
        ({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, 404, "not_found_error"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error"),
        ({"model": MODEL, "max_tokens": 5, "messages": []}, 400, "invalid_request_error"),
        ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
         400, "invalid_request_error"),
        ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "wizard", "content": "hi"}]},
         400, "invalid_request_error"),
        ({"model": MODEL, "max_tokens": 5, "temperature": 3, "messages": [{"role": "user", "content": "hi"}]},
         400, "invalid_request_error"),
    ],
    ids=["unknown-model", "no-max-tokens", "no-messages", "image", "role", "temperature"],
)
def test_bad_requests_get_anthropic_errors(stack, body, status, kind):
    for stream in (False, True):
        r = httpx.post(f"{stack.base_url}/v1/messages?beta=true", json={**body, "stream": stream}, timeout=30)
        assert r.status_code == status, r.text
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind and r.json()["error"]["message"]


def test_sdk_error_types(client):
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError) as error:
        client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi " * 300_000}])
    assert "context window" in error.value.message


def test_malformed_json_and_unknown_fields(stack):
    r = httpx.post(f"{stack.base_url}/v1/messages", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
            "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}, "brand_new_field": {"x": 1},
            "context_management": {"edits": []}, "service_tier": "auto", "metadata": {"user_id": "u"},
            "tools": [WEATHER_TOOL, {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
    r = httpx.post(f"{stack.base_url}/v1/messages?beta=true", json=body, timeout=60,
                   headers={"anthropic-beta": "made-up-beta-2099-01-01", "anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_captured_claude_code_requests_replay(stack, name):
    """What Claude Code 2.1.328 really sent, against the scripted model (whose context fits it)."""
    captured = json.loads((FIXTURES / name).read_text())
    body = {**captured["body"], "model": MODEL, "max_tokens": 16}
    headers = {k: v for k, v in captured["headers"].items()
               if k.lower().startswith(("anthropic-", "x-claude", "x-app", "user-agent"))}
    with httpx.stream("POST", f"{stack.base_url}{captured['path']}", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    assert events[-2]["delta"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use")


def test_a_killed_worker_mid_stream_gives_an_error_event(fresh_stack, tiny_model_dir):
    fresh_stack.start_gateway()
    worker = fresh_stack.start_worker(str(tiny_model_dir), "tiny-long", "--context-length", "100000")
    fresh_stack.wait_for_models("tiny-long")
    body = {"model": "tiny-long", "max_tokens": 50_000, "stream": True,
            "messages": [{"role": "user", "content": "go on forever"}]}
    with httpx.stream("POST", f"{fresh_stack.base_url}/v1/messages", json=body, timeout=60) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
                if events.count("content_block_delta") == 3:
                    worker.kill()
                    killed_at = time.monotonic()
    assert time.monotonic() - killed_at < 3.0, "the stream did not end soon after the worker died"
    assert events[0] == "message_start" and events[-1] == "error", events[-3:]
    assert "message_stop" not in events
