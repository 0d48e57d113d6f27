"""/v1/messages through the real gateway and a (scripted) worker, with the official anthropic SDK.

The worker is tests/scripted_worker.py on the tiny "qwen" model: "SCRIPT:<text>" in the last
user message makes the model write <text> (tool calls, thinking); everything else is sampled.
The SDK parses every reply and every stream event into its types.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from conftest import SCRIPTED
from processes import Stack
from pydantic import TypeAdapter
from request_fixtures import CLAUDE_CODE, load, request_params

MODEL = SCRIPTED
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
    # A result for a call that was never made: Anthropic's 400, for a stream too.
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(model=MODEL, max_tokens=8, tools=[WEATHER_TOOL], stream=stream, messages=[
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_nowhere", "content": "x"}]}])
        message = caught.value.body["error"]["message"]
        assert "unexpected `tool_use_id` found in `tool_result` blocks: toolu_nowhere" in message, message
        assert message.startswith("messages.2.content.0: ")


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


def test_the_sdk_lists_the_served_models_in_anthropics_shape(client):
    """Claude Code's discovery keeps ids that say "claude": each model is listed as claude-local/NAME,
    a name the gateway answers as NAME."""
    page = client.models.list()
    listed = f"claude-local/{MODEL}"
    assert [(m.id, m.display_name) for m in page.data] == [(listed, MODEL)] and not page.has_more
    assert page.first_id == page.last_id == listed and page.data[0].created_at.year >= 2026
    assert page.data[0].max_input_tokens == 200_000
    assert client.models.retrieve(listed).display_name == client.models.retrieve(MODEL).display_name == MODEL
    reply = client.messages.create(model=listed, max_tokens=16, thinking=NO_THINKING,
                                   messages=[{"role": "user", "content": "SCRIPT:Listed and served."}])
    assert reply.content[0].text == "Listed and served."


def test_sdk_error_types(client, stack):
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as error:
            client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi " * 300_000}],
                                   stream=stream)
        # Anthropic's words, which Claude Code reads to learn by how much to compact.
        body = error.value.body
        assert body["error"]["type"] == "invalid_request_error", body
        match = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum", body["error"]["message"])
        assert match and int(match[1]) > int(match[2]) == 200_000, body
        assert re.search(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", body["error"]["message"])
    # Other APIs keep OpenAI's code and name the prompt's field.
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi " * 300_000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert r.json()["error"]["param"] == "messages"


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


def script_for(blocks: list[dict[str, Any]], thinking_open: bool) -> str:
    """Model text our parsers turn into these content blocks. With thinking on, the template
    has opened the thinking block already: the reply starts inside it."""
    assert not thinking_open or blocks[0]["type"] == "thinking", "with thinking on, a reply starts with thinking"
    parts = []
    for index, block in enumerate(blocks):
        if block["type"] == "thinking":
            parts.append(f"{block['thinking']}</think>" if thinking_open and index == 0
                         else f"<think>{block['thinking']}</think>")
        elif block["type"] == "text":
            parts.append(block["text"])
        elif block["type"] == "tool_use":
            parts.append(f"<tool_call>{json.dumps({'name': block['name'], 'arguments': block['input']})}</tool_call>")
        else:
            raise AssertionError(f"no script for a {block['type']} block")
    return "".join(parts)


def streamed_blocks(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The content blocks a stream builds: each block's start, with its deltas applied."""
    blocks: list[dict[str, Any]] = []
    inputs: dict[int, str] = {}
    for event in events:
        if event["type"] == "content_block_start":
            blocks.append(dict(event["content_block"]))
        elif event["type"] == "content_block_delta":
            block, delta = blocks[event["index"]], event["delta"]
            if delta["type"] == "input_json_delta":
                inputs[event["index"]] = inputs.get(event["index"], "") + delta["partial_json"]
            else:
                key = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "signature"}[delta["type"]]
                block[key] = block.get(key, "") + delta[key]
    for index, text in inputs.items():
        blocks[index]["input"] = json.loads(text)
    return blocks


@pytest.mark.parametrize("path", request_params(CLAUDE_CODE))
def test_claude_code_requests_replay(stack, path: Path):
    """What Claude Code sends, against the scripted model (whose context fits it): the project's
    fixtures (tests/fixtures/requests/claude-code), and what Claude Code 2.1.328 really sent
    (../shared/fixtures/claude-code; see request_fixtures.py for MLXGW_SHARED_FIXTURES).

    A fixture with a ``mock_reply`` gets those content blocks from the model (a script), and
    they must come back; a capture has none, and its reply is sampled, 16 tokens at most."""
    assert path.is_file(), f"no captures in {path}"  # on CI, where they must be there
    request = load(path)
    body = {**request["body"], "model": MODEL}
    expected = (request.get("mock_reply") or {}).get("content")
    if expected:
        thinking_open = (body.get("thinking") or {}).get("type") in ("enabled", "adaptive")
        body["chat_template_kwargs"] = {"test_script": script_for(expected, thinking_open)}
    elif "max_tokens" in body:
        body["max_tokens"] = 16
    headers = {k: v for k, v in request["headers"].items()
               if k.lower().startswith(("anthropic-", "x-claude", "x-app", "user-agent"))}
    url = f"{stack.base_url}{request['path']}"
    if "/count_tokens" in request["path"]:
        r = httpx.post(url, json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["input_tokens"] > 100
        return
    if body.get("stream"):
        with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as r:
            assert r.status_code == 200, r.read()
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        for event in events:
            if event["type"] != "ping":  # the SDK reads pings apart from its event union
                TypeAdapter(RawMessageStreamEvent).validate_python(event)
        assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
        blocks = streamed_blocks(events)
        stop_reason = events[-2]["delta"]["stop_reason"]
    else:
        r = httpx.post(url, json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        message = Message.model_validate(r.json())
        blocks, stop_reason = [b.model_dump() for b in message.content], message.stop_reason
    if not expected:
        assert stop_reason in ("end_turn", "max_tokens", "tool_use")
        return
    assert [b["type"] for b in blocks] == [b["type"] for b in expected]
    assert stop_reason == ("tool_use" if any(b["type"] == "tool_use" for b in expected) else "end_turn")
    for ours, mock in zip(blocks, expected, strict=True):
        if ours["type"] == "thinking":
            assert ours["signature"]
        elif ours["type"] == "tool_use":
            assert (ours["name"], ours["input"]) == (mock["name"], mock["input"])


def test_a_killed_worker_mid_stream_gives_an_error_event(fresh_stack, tiny_model_dir):
    fresh_stack.start_gateway()
    worker = fresh_stack.start_worker(str(tiny_model_dir), "tiny-long", "--context-length", "100000",
                                      "--max-output-tokens", "0")
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
