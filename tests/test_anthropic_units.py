"""Anthropic Messages pieces on their own: the body, conversion to chat messages, and events
checked with the official SDK's types and its stream accumulator. No servers, no mlx."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import ErrorResponse, Message, RawMessageStreamEvent, Usage
from pydantic import TypeAdapter, ValidationError
from request_fixtures import PROJECT_FIXTURES, SHARED_FIXTURES

from gateway.anthropic.convert import omits_thinking, to_request
from gateway.anthropic.events import MessageEvents
from gateway.anthropic.request import CountTokensRequest, MessagesBody, MessagesRequest
from gateway.anthropic.signature import thinking_from_signature
from gateway.api.errors import APIError
from gateway.api.request import to_generate
from protocol import Delta, Finished, Generate, ToolCall

SAY_HI, TURN1, TURN2 = "say-hi", "turn1", "turn2"


@dataclass(frozen=True)
class Source:
    """A set of Claude Code requests: a say-hi, a tool call's first turn and its second turn
    (the tool's result), and what their content says."""

    folder: Path
    files: dict[str, str]
    system_says: str
    tools: int  # offered: the deferred placeholder is not
    placeholder: str
    call: tuple[str, dict[str, Any], str]  # the turn-2 call's id, input and the tool's result


SOURCES = {
    # The project's own (tests/fixtures/requests/claude-code), in every clone.
    "project": Source(PROJECT_FIXTURES / "claude-code", {SAY_HI: "001-print-stream.json", TURN1: "002-tool-turn1-stream.json",
                                                         TURN2: "003-tool-turn2-result-stream.json"},
                      "You are a coding assistant.", 5, "Placeholder",
                      ("toolu_01", {"command": "touch notes.txt", "description": "make the file"}, "(no output)")),
    # What Claude Code 2.1.328 sent (../shared, never in the repository; request_fixtures.py).
    "captures": Source(SHARED_FIXTURES / "claude-code", {SAY_HI: "001-print-say-hi-stream.json",
                                                          TURN1: "002-tool-turn1-stream.json",
                                                          TURN2: "003-tool-turn2-tool-result-stream.json"},
                       "You are a Claude agent", 11, "DeferredToolPlaceholder",
                       ("toolu_1", {"command": "echo hi > made_by_tool.txt", "description": "write a file"},
                        "(Bash completed with no output)")),
}


@pytest.fixture(params=list(SOURCES))
def source(request) -> Source:
    found = SOURCES[request.param]
    if not found.folder.is_dir() and not os.environ.get("CI"):
        pytest.skip(f"no {found.folder}")
    return found

# ChatML, as SmolLM2's and Qwen's templates render it: enough to compare prompts as text.
CHATML = jinja2.Environment().from_string(
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n")


def to_chat(body: MessagesBody) -> Generate:
    """What the worker gets for ``body``: chat messages, tools and switches."""
    return to_generate(to_request(body), "msg_test")


def fixture(source: Source, name: str) -> MessagesRequest:
    return MessagesRequest.model_validate(json.loads((source.folder / source.files[name]).read_text())["body"])


def body(messages: list[dict[str, Any]], **extra: Any) -> MessagesRequest:
    return MessagesRequest(model="m", max_tokens=100, messages=messages, **extra)


HI = [{"role": "user", "content": "hi"}]


def tool(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "description": f"{name} it", "input_schema": {"type": "object", "properties": {}}, **extra}


def names(prompt: Generate) -> list[str] | None:
    return prompt.tools and [t["function"]["name"] for t in prompt.tools]


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def use(call_id: str, name: str = "Read") -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": {"path": call_id}}


def refused(messages: list[dict[str, Any]]) -> APIError:
    with pytest.raises(APIError) as caught:
        to_chat(body(messages))
    assert caught.value.status == 400
    return caught.value


# --- the body -----------------------------------------------------------------------


def test_unknown_fields_are_accepted_and_max_tokens_is_required_only_to_generate():
    request = body(HI, betas_of_2031={"x": 1}, context_management={"edits": []})
    assert request.model_extra == {"betas_of_2031": {"x": 1}}
    with pytest.raises(ValidationError):
        MessagesRequest(model="m", messages=HI)
    with pytest.raises(ValidationError):
        body(HI, temperature=1.5)
    assert to_chat(CountTokensRequest(model="m", messages=HI)).messages == HI


# --- Claude Code's requests ---------------------------------------------------------


@pytest.mark.parametrize("name", [SAY_HI, TURN1, TURN2])
def test_claude_code_requests_convert(source: Source, name: str):
    prompt = to_chat(fixture(source, name))
    system, first_user = prompt.messages[0], prompt.messages[1]
    assert system["role"] == "system" and source.system_says in system["content"]
    assert "x-anthropic-billing-header" not in CHATML.render(messages=prompt.messages)
    # The system message Claude Code puts in `messages` stays in the first user turn, marked.
    assert first_user["role"] == "user" and first_user["content"].startswith("<system-reminder>\n")
    assert "<system-reminder>\n# Environment" in first_user["content"]
    roles = [m["role"] for m in prompt.messages]
    assert all(a != b or a == "tool" for a, b in zip(roles, roles[1:], strict=False)), roles
    offered = names(prompt)
    assert "Bash" in offered and source.placeholder not in offered and len(offered) == source.tools
    assert prompt.tool_choice == "auto" and prompt.parallel_tool_calls
    assert prompt.chat_template_kwargs == {"enable_thinking": True} and omits_thinking(fixture(source, name))


def test_tool_use_and_tool_result_pair_by_id(source: Source):
    messages = to_chat(fixture(source, TURN2)).messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    (call,) = messages[2]["tool_calls"]
    call_id, arguments, result = source.call
    assert call["id"] == call_id and call["function"]["name"] == "Bash"
    assert json.loads(call["function"]["arguments"]) == arguments
    assert messages[3] == {"role": "tool", "tool_call_id": call_id, "name": "Bash", "content": result}


def test_a_growing_conversation_renders_a_growing_prompt(source: Source):
    request = fixture(source, TURN2)
    turn1, turn2 = to_chat(fixture(source, TURN1)), to_chat(request)
    assert turn2.messages[:len(turn1.messages)] == turn1.messages
    assert CHATML.render(messages=turn2.messages).startswith(CHATML.render(messages=turn1.messages))
    assert turn1.tools == turn2.tools
    # Another session (another billing line) starts with the same system prompt and tools.
    other = to_chat(fixture(source, SAY_HI))
    assert other.messages[0] == turn1.messages[0] and other.tools == turn1.tools
    # A system message added in a later turn lands at the end, not in the first message.
    later = request.messages + [{"role": "assistant", "content": [{"type": "text", "text": "Done."}]},
                                {"role": "system", "content": "Context is 40% full."}, user("thanks")]
    turn3 = to_chat(request.model_copy(update={"messages": later})).messages
    assert turn3[:len(turn2.messages)] == turn2.messages
    assert turn3[-1] == {"role": "user", "content": "<system-reminder>\nContext is 40% full.\n</system-reminder>\n\nthanks"}


# --- content blocks -----------------------------------------------------------------


def test_unreadable_images_and_binary_documents_are_refused_with_where():
    # Images are read (tests/test_images.py); these bytes are no image.
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    error = refused([user([{"type": "text", "text": "look"}, image])])
    assert error.param == "messages.0.content.1.source.data" and "not a PNG" in error.message
    result = {"type": "tool_result", "tool_use_id": "t", "content": [image]}
    assert refused([user("shot"), {"role": "assistant", "content": [use("t")]}, user([result])]).param == \
        "messages.2.content.0.content.0.source.data"
    refused([user([{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "AA=="}}])])


def test_system_messages_before_any_turn_join_the_system_prompt():
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, user("hi")]
    prompt = to_chat(body(messages, system="You help."))
    assert prompt.messages == [{"role": "system", "content": "You help.\n\nBe brief."}, *HI]


def test_text_documents_read_as_text():
    docs = [{"type": "document", "title": "notes.txt", "source": {"type": "text", "media_type": "text/plain", "data": "a"}},
            {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "b"}]}}]
    assert to_chat(body([user(docs)])).messages == [user("notes.txt\n\na\n\nb")]


def test_history_blocks_a_local_model_cannot_use_are_skipped_and_thinking_kept():
    assistant = [
        {"type": "thinking", "thinking": "Search first.", "signature": "EqQBCkYIAx..."},
        {"type": "redacted_thinking", "data": "EmwKAhgB..."},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
        {"type": "text", "text": "Found it."},
        {"type": "hologram", "data": 1},
    ]
    messages = to_chat(body([user("q"), {"role": "assistant", "content": assistant}])).messages
    assert messages[1] == {"role": "assistant", "content": "Found it.", "reasoning_content": "Search first."}


def test_results_follow_their_calls_and_user_text_follows_the_results():
    marked = "<tool_use_error>No such tool available: Nope</tool_use_error>"
    results = [{"type": "text", "text": "also this"},
               {"type": "tool_result", "tool_use_id": "a", "content": [{"type": "text", "text": "X"}]},
               {"type": "tool_result", "tool_use_id": "b", "content": "missing", "is_error": True},
               {"type": "tool_result", "tool_use_id": "c", "content": marked, "is_error": True}]
    messages = to_chat(body([user("read"), {"role": "assistant", "content": [use("a"), use("b"), use("c", "Nope")]},
                             {"role": "system", "content": "between a call and its result"}, user(results)])).messages
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "tool", "user"]
    assert [(m["tool_call_id"], m["name"], m["content"]) for m in messages[2:5]] == [
        ("a", "Read", "X"), ("b", "Read", "Error: missing"), ("c", "Nope", marked)]
    assert messages[5]["content"] == "<system-reminder>\nbetween a call and its result\n</system-reminder>\n\nalso this"


def test_consecutive_messages_of_one_role_merge_and_bad_ones_are_400():
    messages = to_chat(body([user("a"), user([{"type": "text", "text": "b"}]),
                             {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"}])).messages
    assert messages == [user("a\n\nb"), {"role": "assistant", "content": "c\n\nd"}]
    assert refused([{"role": "tool", "content": "x"}]).param == "messages.0.role"
    assert refused([{"role": "assistant", "content": [{"type": "tool_use", "name": "f"}]}]).param == "messages.0.content.0.id"


# --- tools and switches -------------------------------------------------------------


def test_server_tools_are_left_out():
    tools = [tool("Read"), {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
             {"type": "bash_20250124", "name": "bash"}, {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
             tool("Write", type="custom")]
    prompt = to_chat(body(HI, tools=tools))
    assert names(prompt) == ["Read", "Write"] and prompt.tools[0]["function"]["parameters"]["type"] == "object"


def test_deferred_tools_are_offered_once_a_tool_search_loads_them():
    tools = [tool("ToolSearch"), tool("WebFetch", defer_loading=True)]
    assert names(to_chat(body([user("fetch")], tools=tools))) == ["ToolSearch"]
    loaded = [{"type": "tool_result", "tool_use_id": "s", "content": [{"type": "tool_reference", "tool_name": "WebFetch"}]}]
    history = [user("fetch"), {"role": "assistant", "content": [use("s", "ToolSearch")]}, user(loaded)]
    prompt = to_chat(body(history, tools=tools))
    assert names(prompt) == ["ToolSearch", "WebFetch"] and prompt.messages[-1]["content"] == "Tool loaded: WebFetch"


@pytest.mark.parametrize("choice, offered, mode, parallel", [
    (None, ["A", "B"], "auto", True),
    ({"type": "auto"}, ["A", "B"], "auto", True),
    ({"type": "any"}, ["A", "B"], "required", True),
    ({"type": "tool", "name": "B", "disable_parallel_tool_use": True}, ["B"], "required", False),
    ({"type": "none"}, None, "auto", True),
])
def test_tool_choice(choice, offered, mode, parallel):
    prompt = to_chat(body(HI, tools=[tool("A"), tool("B")], tool_choice=choice))
    assert (names(prompt), prompt.tool_choice, prompt.parallel_tool_calls) == (offered, mode, parallel)
    with pytest.raises(APIError) as caught:  # naming a tool that is not there
        to_chat(body(HI, tools=[tool("A")], tool_choice={"type": "tool", "name": "Z"}))
    assert caught.value.status == 400 and caught.value.param == "tool_choice"


@pytest.mark.parametrize("thinking, extra, kwargs", [
    ({"type": "enabled", "budget_tokens": 2048}, None, {"enable_thinking": True}),
    ({"type": "adaptive"}, None, {"enable_thinking": True}),
    ({"type": "disabled"}, None, {"enable_thinking": False}),
    (None, None, {}),
    ({"type": "enabled", "budget_tokens": 1024}, {"enable_thinking": False, "x": 1}, {"enable_thinking": False, "x": 1}),
])
def test_thinking_switch_and_explicit_template_kwargs(thinking, extra, kwargs):
    assert to_chat(body(HI, thinking=thinking, chat_template_kwargs=extra)).chat_template_kwargs == kwargs


# --- events, checked with the SDK -----------------------------------------------------

EVENT = TypeAdapter(RawMessageStreamEvent)


def run(deltas: list[Delta], finish_reason: str = "stop", **options: Any) -> tuple[MessageEvents, list[dict[str, Any]]]:
    stop_sequence_hit = options.pop("stop_sequence_hit", None)
    builder = MessageEvents("msg_test", "m", **options)
    events = builder.start(prompt_tokens=30, cached_tokens=0)
    for delta in deltas:
        events += builder.add(delta)
    events += builder.finish(Finished("r", finish_reason, prompt_tokens=30, completion_tokens=12, cached_tokens=20,
                                      reasoning_tokens=5), stop_sequence_hit)
    return builder, events


def check(builder: MessageEvents, events: list[dict[str, Any]]) -> Message:
    """Events in order, each a valid SDK event; the SDK's accumulation equals ``message()``."""
    assert [e["type"] for e in events[:1] + events[-2:]] == ["message_start", "message_delta", "message_stop"]
    snapshot, json_bufs, open_index, next_index = None, {}, None, 0
    for event in json.loads(json.dumps(events)):
        typed = EVENT.validate_python(event)
        if event["type"] == "content_block_start":
            assert open_index is None and event["index"] == next_index
            open_index, next_index = event["index"], next_index + 1
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_index
        elif event["type"] == "content_block_stop":
            assert event["index"] == open_index
            open_index = None
        snapshot = accumulate_event(event=typed, current_snapshot=snapshot, json_bufs=json_bufs)
    data = builder.message()
    message = Message.model_validate(data)  # and nothing the SDK does not know:
    assert set(data) <= set(Message.model_fields) and set(data["usage"]) <= set(Usage.model_fields)
    for raw, block in zip(data["content"], message.content, strict=True):
        assert set(raw) <= set(type(block).model_fields)
    fields = {"content", "stop_reason", "stop_sequence", "usage"}
    assert snapshot.model_dump(include=fields, exclude_none=True) == message.model_dump(include=fields, exclude_none=True)
    return message


def test_text_only():
    message = check(*run([Delta("r", text="\n"), Delta("r", text="Hello"), Delta("r", text=" world.")]))
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == "Hello world."
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    u = message.usage  # Anthropic's input_tokens: the prompt not served from cache
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens) == (10, 20, 0, 12)
    assert u.output_tokens_details.thinking_tokens == 5


def test_thinking_then_text():
    builder, events = run([Delta("r", reasoning="Let me"), Delta("r", reasoning=" think."), Delta("r", text="\n\nHi!")])
    message = check(builder, events)
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking == "Let me think." and text.text == "Hi!"
    assert thinking_from_signature(thinking.signature) == "Let me think."
    assert [e["delta"]["type"] for e in events if e.get("index") == 0 and "delta" in e][-1] == "signature_delta"


def test_omitted_thinking_travels_in_the_signature_and_comes_back():
    builder, events = run([Delta("r", reasoning="secret plan"), Delta("r", text="Done.")], omit_thinking=True)
    message = check(builder, events)
    assert message.content[0].thinking == ""
    assert not any(e["type"] == "content_block_delta" and e["delta"]["type"] == "thinking_delta" for e in events)
    assert to_chat(body([user("go"), builder.message()])).messages[1]["reasoning_content"] == "secret plan"


def test_text_then_tool_call():
    call = ToolCall("call_1", "Bash", '{"command": "ls"}')
    builder, events = run([Delta("r", text="Checking."), Delta("r", text="\n", tool_calls=[call])])
    message = check(builder, events)
    text, block = message.content
    assert text.text == "Checking.\n" and message.stop_reason == "tool_use"
    assert (block.type, block.name, block.input) == ("tool_use", "Bash", {"command": "ls"}) and block.id.startswith("toolu_")
    # Sent back as history, the call keeps its id.
    (sent,) = to_chat(body([user("ls"), builder.message()])).messages[1]["tool_calls"]
    assert sent["id"] == block.id and json.loads(sent["function"]["arguments"]) == {"command": "ls"}


def test_blank_text_before_a_call_makes_no_block_and_one_call_without_parallel():
    calls = [ToolCall("c1", "A", "[1, 2]"), ToolCall("c2", "B", "{}")]
    message = check(*run([Delta("r", text="\n\n"), Delta("r", tool_calls=calls)], parallel=False))
    assert [(b.type, b.name, b.input) for b in message.content] == [("tool_use", "A", {"input": [1, 2]})]


def test_max_tokens_stop_sequence_and_error():
    assert check(*run([Delta("r", text="Once upon")], "length")).stop_reason == "max_tokens"
    message = check(*run([Delta("r", text="a, b")], stop_sequence_hit="###"))
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "###")
    event = MessageEvents("msg_x", "m").error("overloaded_error", "busy")
    assert ErrorResponse.model_validate(event).error.type == "overloaded_error"
