"""The one internal request: the same conversation, asked in each API, reaches the worker as
the same ``Generate``. No servers, no mlx."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.anthropic.convert import to_request as messages_request
from gateway.anthropic.request import CountTokensRequest, MessagesRequest
from gateway.api.family import CHAT, COMPLETIONS, MESSAGES, RESPONSES, family_for_path
from gateway.api.request import to_generate
from gateway.chat.convert import chat_request, completion_request
from gateway.chat.request import ChatCompletionRequest, CompletionRequest
from gateway.responses.convert import normalize_input
from gateway.responses.convert import to_request as responses_request
from gateway.responses.request import ResponsesRequest
from gateway.responses.tools import resolve_tools
from protocol import Generate

SCHEMA = {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}
ARGUMENTS = '{"path": "a.txt"}'
ANSWER_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}}


def chat(**extra: Any) -> Generate:
    body = ChatCompletionRequest.model_validate({
        "model": "m", "max_tokens": 50, "temperature": 0.2, "top_p": 0.9,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Read a.txt."},
            {"role": "assistant", "content": "Reading.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "read", "arguments": ARGUMENTS}}]},
            {"role": "tool", "tool_call_id": "call_1", "name": "read", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "read", "description": "Read a file.", "parameters": SCHEMA}}],
        **extra,
    })
    return to_generate(chat_request(body), "r")


def responses(**extra: Any) -> Generate:
    body = ResponsesRequest.model_validate({
        "model": "m", "max_output_tokens": 50, "temperature": 0.2, "top_p": 0.9, "instructions": "Be brief.",
        "tools": [{"type": "function", "name": "read", "description": "Read a file.", "parameters": SCHEMA}],
        **extra,
    })
    context = normalize_input([
        {"role": "user", "content": "Read a.txt."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Reading."}]},
        {"type": "function_call", "call_id": "call_1", "name": "read", "arguments": ARGUMENTS},
        {"type": "function_call_output", "call_id": "call_1", "output": "hello"},
        {"role": "user", "content": [{"type": "input_text", "text": "And now?"}]},
    ])
    tools = resolve_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    return to_generate(responses_request(body, context, tools), "r")


def messages(**extra: Any) -> Generate:
    body = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 50, "temperature": 0.2, "top_p": 0.9,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Read a.txt."},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Reading."},
                {"type": "tool_use", "id": "call_1", "name": "read", "input": {"path": "a.txt"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "hello"},
                                         {"type": "text", "text": "And now?"}]},
        ],
        "tools": [{"name": "read", "description": "Read a file.", "input_schema": SCHEMA}],
        **extra,
    })
    return to_generate(messages_request(body), "r")


def test_one_conversation_in_three_apis_is_one_generate() -> None:
    reference = chat()
    assert reference.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Read a.txt."},
        {"role": "assistant", "content": "Reading.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "read", "arguments": ARGUMENTS}}]},
        {"role": "tool", "content": "hello", "tool_call_id": "call_1", "name": "read"},
        {"role": "user", "content": "And now?"},
    ]
    assert reference.tools == [{"type": "function", "function": {"name": "read", "description": "Read a file.",
                                                                 "parameters": SCHEMA}}]
    for other in (responses(), messages()):
        assert other == reference


@pytest.mark.parametrize("required", [
    (chat, {"tool_choice": "required"}),
    (responses, {"tool_choice": "required"}),
    (messages, {"tool_choice": {"type": "any"}}),
])
def test_a_required_tool_call_is_the_same_in_each_api(required) -> None:
    make, fields = required
    generate = make(**fields)
    assert generate.tool_choice == "required" and [t["function"]["name"] for t in generate.tools] == ["read"]


@pytest.mark.parametrize("disabled", [
    (chat, {"tool_choice": "none"}),
    (responses, {"tool_choice": "none"}),
    (messages, {"tool_choice": {"type": "none"}}),
])
def test_no_tools_offered_is_the_same_in_each_api(disabled) -> None:
    make, fields = disabled
    generate = make(**fields)
    assert generate.tools is None and generate.tool_choice == "auto"


def test_a_json_schema_reply_is_the_same_constraint_and_instruction_in_each_api() -> None:
    asked = [
        chat(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}}),
        responses(text={"format": {"type": "json_schema", "name": "a", "schema": ANSWER_SCHEMA}}),
        messages(output_config={"format": {"type": "json_schema", "schema": ANSWER_SCHEMA}}),
    ]
    assert asked[0].constraint == {"type": "json_schema", "schema": ANSWER_SCHEMA}
    assert asked[0].messages[0]["content"].startswith("Be brief.\n\nRespond with only a JSON object")
    assert all(generate == asked[0] for generate in asked[1:])


def test_thinking_switches_are_the_same_template_switch() -> None:
    assert responses(reasoning={"effort": "high"}).chat_template_kwargs == {"enable_thinking": True}
    assert messages(thinking={"type": "enabled", "budget_tokens": 1024}).chat_template_kwargs == {"enable_thinking": True}
    assert responses(reasoning={"effort": "none"}).chat_template_kwargs == {"enable_thinking": False}
    assert messages(thinking={"type": "disabled"}).chat_template_kwargs == {"enable_thinking": False}


def test_count_tokens_renders_the_same_prompt_and_generates_nothing() -> None:
    generating = messages(output_config={"format": {"type": "json_schema", "schema": ANSWER_SCHEMA}})
    body = CountTokensRequest.model_validate({
        "model": "m", "system": "Be brief.", "messages": [{"role": "user", "content": "Read a.txt."}],
        "output_config": {"format": {"type": "json_schema", "schema": ANSWER_SCHEMA}}})
    counting = to_generate(messages_request(body), "r")
    assert counting.count_only and counting.constraint is None and counting.max_tokens is None
    assert counting.messages[0] == generating.messages[0]  # the instruction is counted too


def test_completions_send_the_prompt_untemplated() -> None:
    generate = to_generate(completion_request(CompletionRequest(model="m", prompt=["Once"], stop="\n")), "r")
    assert (generate.prompt, generate.messages, generate.tools, generate.stop, generate.max_tokens) == (
        "Once", None, None, ["\n"], 16)


def test_each_family_is_found_by_its_paths_and_names_its_own_fields() -> None:
    assert family_for_path("/v1/messages/count_tokens") is MESSAGES and MESSAGES.error_shape == "anthropic"
    assert family_for_path("/v1/responses/compact") is RESPONSES and RESPONSES.prompt_param == "input"
    assert family_for_path("/v1/chat/completions") is CHAT and CHAT.format_param == "response_format"
    assert family_for_path("/v1/completions") is COMPLETIONS and COMPLETIONS.prompt_param == "prompt"
    assert family_for_path("/v1/models").error_shape == "openai" and family_for_path("/v1/messagesX") is not MESSAGES
    assert CHAT.new_id().startswith("chatcmpl-") and MESSAGES.new_id().startswith("msg_") and len(MESSAGES.new_id()) == 28


def test_a_compaction_renders_the_turn_as_it_was_then_asks_for_text() -> None:
    """The summary request extends the turn's prompt (the prefix cache holds it), format
    instruction included, but the summary itself is not constrained."""
    from gateway.responses.compaction import summary_run
    from gateway.responses.objects import ResponseState

    fmt = {"format": {"type": "json_schema", "name": "a", "schema": ANSWER_SCHEMA}}
    body = ResponsesRequest.model_validate({"model": "m", "instructions": "Be brief.", "text": fmt})
    items = normalize_input([{"role": "user", "content": "Read a.txt."}, {"type": "compaction_trigger"}])
    turn = responses_request(body, items, resolve_tools(None, "auto", True))
    planned = summary_run(items, items, turn, body, ResponseState("resp_1", body))
    assert planned is not None
    summary, turn_generate = to_generate(planned[0], "r"), to_generate(turn, "r")
    assert summary.messages[:len(turn_generate.messages)] == turn_generate.messages
    assert summary.constraint is None and summary.tool_choice == "auto"


def test_a_named_tool_that_is_not_offered_is_refused_even_with_no_tools() -> None:
    from gateway.api.errors import APIError

    with pytest.raises(APIError) as caught:
        messages(tools=[], tool_choice={"type": "tool", "name": "read_file"})
    assert caught.value.param == "tool_choice"
    with pytest.raises(APIError):
        chat(tool_choice={"type": "function", "function": {"name": "nope"}})
