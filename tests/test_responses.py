"""/v1/responses through the real gateway and a (scripted) worker, with the official SDK.

The worker is tests/scripted_worker.py on the tiny "qwen" model: a user message starting with
"SCRIPT:" makes the model write the rest (tool calls, thinking), everything else is sampled.
Every reply is checked with the SDK's strict types and every stream with check_stream.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from conftest import SCRIPTED
from processes import Stack
from responses_sse import check_stream, post_stream, read_events, sdk_validate_response

from gateway.responses import compaction_item

MODEL = SCRIPTED
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
WEATHER_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def stack(scripted_stack: Stack) -> Stack:
    return scripted_stack


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0,
                         timeout=60, _strict_response_validation=True)


def create(client: openai.OpenAI, **kwargs):
    kwargs.setdefault("extra_body", NO_THINKING)
    return client.responses.create(model=MODEL, **kwargs)


def test_create_plain_text(client):
    response = create(client, input="Hello there", max_output_tokens=8, temperature=0)
    assert response.object == "response" and response.model == MODEL
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].type == "message" and response.output[0].status == "incomplete"
    assert response.output_text
    assert response.usage.output_tokens == 8 and response.usage.input_tokens > 5
    assert response.usage.output_tokens_details.reasoning_tokens == 0


def test_a_repeated_prompt_reports_cached_tokens_and_the_same_output(client):
    body = {"input": "A question nobody asked before: why is the sky blue?", "max_output_tokens": 8,
            "temperature": 0}
    first = create(client, **body)
    second = create(client, **body)
    assert second.usage.input_tokens_details.cached_tokens == second.usage.input_tokens - 1
    assert second.output_text == first.output_text


def test_create_streaming_matches_the_sdk_and_our_validator(stack, client):
    body = {"model": MODEL, "input": "SCRIPT:Hello, world! How are you?", **NO_THINKING}
    final = check_stream(post_stream(stack.base_url, body))
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == "Hello, world! How are you?"
    with client.responses.create(model=MODEL, input="SCRIPT:Streaming works.", stream=True, extra_body=NO_THINKING) as s:
        events = list(s)
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "Streaming works."


def test_stream_helper_final_response(client):
    # Token by token (speculative decoding would bring the prompt's copy in one wide step, as its timing decides).
    with client.responses.stream(model=MODEL, input="SCRIPT:The helper is happy.",
                                 extra_body={**NO_THINKING, "speculative": False}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "The helper is happy."
    assert len(deltas) > 2


def test_tool_round_trip_with_function_call_output(client):
    first = create(client, input=f"SCRIPT:{WEATHER_CALL}", tools=[WEATHER_TOOL])
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and call.id != call.call_id
    # Resend the history with the tool's result, as stateless clients (Codex) do.
    second = create(client, tools=[WEATHER_TOOL], max_output_tokens=6, input=[
        {"role": "user", "content": f"SCRIPT:{WEATHER_CALL}"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24C"},
    ])
    assert second.output[0].type == "message"
    assert second.usage.input_tokens > first.usage.input_tokens


@pytest.mark.parametrize("kind", ["function_call_output", "custom_tool_call_output"])
def test_a_tool_output_for_a_call_that_does_not_exist_is_refused(client, kind):
    """OpenAI refuses an output whose call is neither in the input nor in the chain it continues."""
    first = create(client, input=f"SCRIPT:{WEATHER_CALL}", tools=[WEATHER_TOOL])
    dangling = [{"role": "user", "content": "Hi"}, {"type": kind, "call_id": "call_nowhere", "output": "sunny"}]
    for extra in ({}, {"previous_response_id": first.id}):
        with pytest.raises(openai.BadRequestError) as caught:
            create(client, tools=[WEATHER_TOOL], input=dangling, **extra)
        error = caught.value.body
        assert "call_nowhere" in error["message"] and error["param"] == "input[1]", error
    # The real call, from the chain it continues: accepted.
    answer = create(client, tools=[WEATHER_TOOL], previous_response_id=first.id, max_output_tokens=4,
                    input=[{"type": "function_call_output", "call_id": first.output[0].call_id, "output": "sunny"}])
    assert answer.status in ("completed", "incomplete")


def test_streamed_tool_call(stack):
    body = {"model": MODEL, "input": f"SCRIPT:Checking.{WEATHER_CALL}", "tools": [WEATHER_TOOL], **NO_THINKING}
    final = check_stream(post_stream(stack.base_url, body))
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["arguments"] == '{"city": "Paris"}'


def test_previous_response_id_chain_retrieve_input_items_and_delete(client):
    first = create(client, input=f"SCRIPT:{WEATHER_CALL}", tools=[WEATHER_TOOL], instructions="Be terse.")
    call = first.output[0]
    second = create(client, previous_response_id=first.id, tools=[WEATHER_TOOL], input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        {"role": "user", "content": "SCRIPT:It is sunny in Paris."},
    ])
    assert second.previous_response_id == first.id and second.instructions is None
    assert second.output_text == "It is sunny in Paris."
    # The chain carries the first input and output: more input tokens than the new items alone.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens

    assert client.responses.retrieve(second.id).output_text == "It is sunny in Paris."
    items = client.responses.input_items.list(second.id, order="asc")
    assert [i.type for i in items.data] == ["function_call_output", "message"]
    page = client.responses.input_items.list(second.id, limit=1)
    assert len(page.data) == 1 and page.has_more and page.data[0].type == "message"
    rest = client.responses.input_items.list(second.id, limit=1, after=page.data[0].id)
    assert [i.type for i in rest.data] == ["function_call_output"] and not rest.has_more

    third = create(client, previous_response_id=second.id, input="SCRIPT:Chained twice.")
    assert third.output_text == "Chained twice."

    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    with pytest.raises(openai.BadRequestError) as excinfo:
        create(client, previous_response_id=second.id, input="again")
    assert excinfo.value.code == "previous_response_not_found"


def test_streamed_responses_are_stored_and_store_false_is_not(stack, client):
    final = check_stream(post_stream(stack.base_url, {"model": MODEL, "input": "SCRIPT:Kept.", **NO_THINKING}))
    assert client.responses.retrieve(final["id"]).output_text == "Kept."
    ephemeral = create(client, input="SCRIPT:Gone.", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ephemeral.id)
    with pytest.raises(openai.BadRequestError):
        create(client, input="x", previous_response_id=ephemeral.id)


def test_reasoning_items(stack, client):
    response = create(client, input="SCRIPT:<think>The user greets me.</think>Hello!",
                      include=["reasoning.encrypted_content"])
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert reasoning.content[0].type == "reasoning_text" and reasoning.content[0].text == "The user greets me."
    assert reasoning.encrypted_content == "The user greets me."
    assert message.content[0].text == "Hello!"
    assert 0 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens
    body = {"model": MODEL, "input": "SCRIPT:<think>Hmm.</think>Hi!", "reasoning": {"effort": "low"},
            **NO_THINKING}
    final = check_stream(post_stream(stack.base_url, body))
    assert [i["type"] for i in final["output"]] == ["reasoning", "message"]
    # Replayed reasoning items (content null, or only encrypted_content) are context, never an error.
    again = create(client, input=[
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": None, "encrypted_content": "Hmm."},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "SCRIPT:Again."},
    ])
    assert again.output_text == "Again."


def test_reasoning_effort_switches_thinking(client):
    # effort "high" turns the template's thinking on: the reply starts inside <think>.
    response = create(client, input="SCRIPT:Thinking...</think>Done.", reasoning={"effort": "high"}, extra_body={})
    assert [i.type for i in response.output] == ["reasoning", "message"]
    response = create(client, input="SCRIPT:Plain.", reasoning={"effort": "none"}, extra_body={})
    assert [i.type for i in response.output] == ["message"]


def test_custom_and_namespace_tools(stack, client):
    tools = [
        {"type": "custom", "name": "apply_patch", "description": "Edit files", "format": {"type": "text"}},
        {"type": "namespace", "name": "files", "description": "File tools",
         "tools": [{"type": "function", "name": "read_file", "parameters": {"type": "object", "properties": {}}}]},
        {"type": "web_search"}, {"type": "local_shell"}, {"type": "tool_search", "execution": "client"},
    ]
    patch = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"
    script = ('<tool_call>{"name": "apply_patch", "arguments": {"input": ' + json.dumps(patch) + '}}</tool_call>'
              '<tool_call>{"name": "read_file", "arguments": {}}</tool_call>')
    body = {"model": MODEL, "input": f"SCRIPT:{script}", "tools": tools, **NO_THINKING}
    final = check_stream(post_stream(stack.base_url, body))
    custom, member = final["output"]
    assert custom["type"] == "custom_tool_call" and custom["input"] == patch and custom["name"] == "apply_patch"
    assert member["type"] == "function_call" and member["namespace"] == "files"
    # And the history replays (custom_tool_call + output), as Codex sends it.
    follow = create(client, tools=tools, input=[
        {"role": "user", "content": "patch it"},
        {"type": "custom_tool_call", "call_id": custom["call_id"], "name": "apply_patch", "input": patch},
        {"type": "custom_tool_call_output", "call_id": custom["call_id"], "output": "Success"},
        {"role": "user", "content": "SCRIPT:Patched."},
    ])
    assert follow.output_text == "Patched."


def test_tool_choice_and_parallel_calls(client):
    two_calls = f"SCRIPT:{WEATHER_CALL}{WEATHER_CALL}"
    assert len(create(client, input=two_calls, tools=[WEATHER_TOOL]).output) == 2
    assert len(create(client, input=two_calls, tools=[WEATHER_TOOL], parallel_tool_calls=False).output) == 1
    # "none": the template gets no tools, so the markup is just text.
    none = create(client, input=f"SCRIPT:{WEATHER_CALL}", tools=[WEATHER_TOOL], tool_choice="none")
    assert [i.type for i in none.output] == ["message"]
    # "required" / a named function: the whole reply is constrained to a call (worker/constraints.py).
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        forced = create(client, input=f"SCRIPT:{call}", tools=[WEATHER_TOOL], tool_choice=choice)
        assert [(i.type, i.name) for i in forced.output] == [("function_call", "get_weather")]
    with pytest.raises(openai.BadRequestError):
        create(client, input="x", tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "nope"})


def test_instructions_and_system_messages_merge_into_one(client):
    # The tiny template renders every message; a second system message would show up as one.
    response = create(client, instructions="Rule one.", max_output_tokens=1, input=[
        {"role": "developer", "content": "Rule two."},
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": [{"type": "input_text", "text": "Rule three."}]},
    ])
    alone = create(client, max_output_tokens=1, input=[
        {"role": "system", "content": "Rule one.\n\nRule two.\n\nRule three."}, {"role": "user", "content": "Hi"}])
    assert response.usage.input_tokens == alone.usage.input_tokens


def test_text_format_json_schema_is_accepted(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    response = create(client, input='SCRIPT:{"city": "Paris"}',
                      text={"format": {"type": "json_schema", "name": "City", "schema": schema, "strict": True}})
    assert json.loads(response.output_text) == {"city": "Paris"}
    assert response.text.format.type == "json_schema"


def test_unknown_fields_and_codex_extras_are_tolerated(stack):
    body = {"model": MODEL, "input": "SCRIPT:ok", "client_metadata": {"turn": "1"}, "include": ["nope"],
            "prompt_cache_key": "thread-1", "metadata": {"k": "v"}, "user": "me", "service_tier": "auto",
            "text": {"verbosity": "low"}, "store": False, "truncation": "auto", **NO_THINKING}
    r = httpx.post(f"{stack.base_url}/v1/responses", json=body, timeout=60)
    assert r.status_code == 200, r.text
    obj = sdk_validate_response(r.json())
    assert obj.metadata == {"k": "v"} and obj.prompt_cache_key == "thread-1"


def test_penalties_are_echoed_with_strict_tools_and_range_checked(stack):
    plain_tool = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
    body = {"model": MODEL, "input": "SCRIPT:ok ok ok", "presence_penalty": 0.5, "frequency_penalty": -1.5,
            "tools": [WEATHER_TOOL, plain_tool], **NO_THINKING}
    r = httpx.post(f"{stack.base_url}/v1/responses", json=body, timeout=60)
    assert r.status_code == 200, r.text
    sdk_validate_response(r.json())
    obj = r.json()
    assert (obj["presence_penalty"], obj["frequency_penalty"]) == (0.5, -1.5)
    assert obj["output"][0]["content"][0]["text"] == "ok ok ok"  # the script still wins over the penalties
    assert [(t["name"], t["strict"]) for t in obj["tools"]] == [("get_weather", True), ("lookup", None)]
    final = check_stream(post_stream(stack.base_url, {"model": MODEL, "input": "SCRIPT:ok", **NO_THINKING}))
    assert (final["presence_penalty"], final["frequency_penalty"]) == (0.0, 0.0)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "SCRIPT:fine"}], "presence_penalty": 2,
            "frequency_penalty": 1, **NO_THINKING}
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
    for path, bad in [("/v1/responses", {**body, "presence_penalty": 2.5}),
                      ("/v1/chat/completions", {**chat, "frequency_penalty": -3}),
                      ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 9})]:
        r = httpx.post(f"{stack.base_url}{path}", json=bad, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"].endswith("penalty"), (path, r.text)


# --- compaction: the scripted model writes the summary (chat_template_kwargs' test_script). The
# summaries hold "SCRIPT:<text>": once a compaction item is expanded into the context as a user
# message, the scripted model writes <text> (the new user messages carry no script), which shows
# the summary reached the model.

SUMMARY = "SCRIPT:Resumed from the summary."
SUMMARISE = {"chat_template_kwargs": {"test_script": SUMMARY, "enable_thinking": False}}
CONVERSATION = [
    {"role": "user", "content": "Plan three days in Paris for me."},
    {"role": "assistant", "content": "Day one: the Louvre, then a walk along the Seine. " * 20},
    {"role": "user", "content": "Make day two about food."},
]


def test_compact_then_continue_from_the_compaction_item(client):
    compacted = client.responses.compact(model=MODEL, input=CONVERSATION, instructions="Be terse.",
                                         extra_body=SUMMARISE)
    assert compacted.object == "response.compaction" and compacted.id.startswith("resp_")
    (item,) = compacted.output
    assert item.type == "compaction" and item.id.startswith("cmp_")
    assert item.encrypted_content.startswith(compaction_item.ENCRYPTED_PREFIX)
    assert compaction_item.decode_summary(item.encrypted_content) == SUMMARY
    assert compacted.usage.output_tokens > 5 and compacted.usage.input_tokens > 200
    follow = create(client, instructions="Be terse.", input=[
        item.model_dump(exclude_none=True), {"role": "user", "content": "Where were we?"}])
    assert follow.output_text == "Resumed from the summary."
    assert follow.usage.input_tokens < compacted.usage.input_tokens / 2  # the summary replaced the conversation
    # A string input and previous_response_id work as in /v1/responses: the same prompt as the
    # whole history resent.
    first = create(client, input="SCRIPT:Noted.")
    chained = client.responses.compact(model=MODEL, input="Summarise please.", previous_response_id=first.id,
                                       extra_body=SUMMARISE)
    resent = client.responses.compact(model=MODEL, extra_body=SUMMARISE, input=[
        {"role": "user", "content": "SCRIPT:Noted."}, {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Summarise please."}])
    assert chained.usage.input_tokens == resent.usage.input_tokens


def test_compaction_trigger_answers_exactly_one_compaction_item(stack, client):
    history = [*CONVERSATION, {"type": "compaction_trigger"}]
    response = create(client, input=history, extra_body=SUMMARISE)
    assert response.status == "completed" and [i.type for i in response.output] == ["compaction"]
    assert compaction_item.decode_summary(response.output[0].encrypted_content) == SUMMARY
    events = post_stream(stack.base_url, {"model": MODEL, "input": history, **SUMMARISE})
    final = check_stream(events)
    kinds = [e["type"] for e in events]
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 1
    assert "response.compaction.compacting" in kinds
    (item,) = final["output"]
    assert item["type"] == "compaction" and compaction_item.decode_summary(item["encrypted_content"]) == SUMMARY
    # Continuing from it by id: the item stands for the conversation it summarised.
    follow = create(client, previous_response_id=response.id, input="Where were we?")
    assert follow.output_text == "Resumed from the summary."
    assert follow.usage.input_tokens < response.usage.input_tokens / 2


def test_a_chain_continues_from_a_compaction_item(client):
    item = {"type": "compaction", "encrypted_content": compaction_item.encode_summary("SCRIPT:Still resumed.")}
    first = create(client, input=[item, {"role": "user", "content": "Hello again."}])
    assert first.output_text == "Still resumed."
    second = create(client, previous_response_id=first.id, input="And now?")
    assert second.output_text == "Still resumed."  # two turns on, the summary is still in context
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    items = client.responses.input_items.list(first.id, order="asc")
    assert [i.type for i in items.data] == ["compaction", "message"]
    assert items.data[0].encrypted_content == item["encrypted_content"]


def test_compaction_errors_are_openai_errors(stack, client):
    url = f"{stack.base_url}/v1/responses/compact"
    foreign = {"type": "compaction", "encrypted_content": "gAAAAABoQpaqueOpenAIBlob"}
    for body, status, param, code in [
        ({"input": "hi"}, 400, "model", None),
        ({"model": "nope", "input": "hi"}, 404, "model", "model_not_found"),
        ({"model": MODEL, "input": []}, 400, "input", None),
        ({"model": MODEL, "input": [foreign]}, 400, "input[0].encrypted_content", "invalid_encrypted_content"),
        ({"model": MODEL, "input": "hi", "previous_response_id": "resp_unknown"}, 400, "previous_response_id",
         "previous_response_not_found"),
    ]:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
        if code:
            assert error["code"] == code
    with pytest.raises(openai.BadRequestError) as excinfo:
        create(client, input=[foreign, {"role": "user", "content": "hi"}])
    assert excinfo.value.code == "invalid_encrypted_content"
    with pytest.raises(openai.BadRequestError):
        create(client, input=[{"type": "compaction_trigger"}])


def test_accept_header_does_not_decide_streaming(stack):
    r = httpx.post(f"{stack.base_url}/v1/responses", json={"model": MODEL, "input": "SCRIPT:json", **NO_THINKING},
                   headers={"accept": "text/event-stream"}, timeout=60)
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["status"] == "completed"


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"model": "nope", "input": "hi"}, 404, "model_not_found"),
        ({"model": MODEL, "input": "hi", "previous_response_id": "resp_unknown"}, 400, "previous_response_not_found"),
        ({"model": MODEL, "input": [{"type": "function_call", "name": "f"}]}, 400, None),
        ({"model": MODEL, "input": [{"role": "wizard", "content": "x"}]}, 400, None),
        ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, None),
        ({"model": MODEL, "input": [{"type": "item_reference", "id": "msg_missing"}]}, 400, None),
        ({"model": MODEL, "input": "hi", "background": True, "store": False}, 400, None),
        ({"model": MODEL, "input": "hi", "temperature": 3}, 400, None),
        ({"model": MODEL, "input": "hi", "tool_choice": 7}, 400, None),
        ({"model": MODEL, "input": "hi", "tools": [{"type": "function"}]}, 400, None),
        ({"model": MODEL, "input": "hi", "conversation": "conv_1"}, 400, None),
        ({"model": MODEL, "input": "hi", "prompt": {"id": "pmpt_1"}}, 400, None),
    ],
    ids=["model", "previous", "call-id", "role", "image", "reference", "background-store", "temperature",
         "tool-choice", "tool-name", "conversation", "prompt"],
)
def test_bad_requests_are_openai_errors_before_any_stream(stack, body, status, code):
    for stream in (False, True):
        r = httpx.post(f"{stack.base_url}/v1/responses", json={**body, "stream": stream}, timeout=30)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["message"] and set(error) == {"message", "type", "param", "code"}
        if code:
            assert error["code"] == code


def test_context_overflow(stack, tiny_model_dir):
    # The plain tiny model (256-token context) on a second worker.
    worker = stack.start_worker(str(tiny_model_dir), "tiny-small")
    try:
        stack.wait_for_models("tiny-small")
        long_input = "word " * 400
        r = httpx.post(f"{stack.base_url}/v1/responses", json={"model": "tiny-small", "input": long_input}, timeout=30)
        error = r.json()["error"]
        assert r.status_code == 400 and (error["code"], error["param"]) == ("context_length_exceeded", "input")
        # Streaming: Codex recognises overflow only inside the stream, as response.failed.
        events = post_stream(stack.base_url, {"model": "tiny-small", "input": long_input})
        final = check_stream(events, sdk_strict=False)
        assert final["status"] == "failed" and final["error"]["code"] == "context_length_exceeded"
        # Compaction runs through the engine like any generation, and fails the same way.
        r = httpx.post(f"{stack.base_url}/v1/responses/compact", json={"model": "tiny-small", "input": long_input},
                       timeout=30)
        error = r.json()["error"]
        assert r.status_code == 400 and (error["code"], error["param"]) == ("context_length_exceeded", "input")
    finally:
        stack.remove(worker)


def test_background_then_cancel(stack, client):
    started = create(client, input="Tell me a long story", background=True, max_output_tokens=50_000, temperature=0)
    assert started.status == "queued" and started.background
    deadline = time.monotonic() + 10
    while client.responses.retrieve(started.id).status != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    partial = client.responses.retrieve(started.id)
    assert partial.status == "in_progress" and partial.usage is None
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(started.id).status == "cancelled"
    deadline = time.monotonic() + 3
    while httpx.get(f"{stack.base_url}/v1/workers").json()["data"][0]["active"] != 0:
        assert time.monotonic() < deadline, "the worker is still generating the cancelled response"
        time.sleep(0.05)


def test_background_completes_and_can_be_streamed(stack, client):
    started = create(client, input="SCRIPT:Done in the background.", background=True)
    with httpx.stream("GET", f"{stack.base_url}/v1/responses/{started.id}", params={"stream": "true"}) as r:
        events = read_events(r) if r.headers["content-type"].startswith("text/event-stream") else None
    if events is not None:  # still running when we asked: the live stream must be valid
        check_stream(events)
    deadline = time.monotonic() + 10
    while (done := client.responses.retrieve(started.id)).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert done.output_text == "Done in the background."
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(create(client, input="SCRIPT:x").id)


def test_store_survives_a_gateway_restart(stack, client):
    kept = create(client, input="SCRIPT:Persistent.")
    stack.remove(next(p for p in stack.processes if p.name == "gateway"))
    stack.start_gateway()
    stack.wait_for_models(MODEL, timeout=30)  # the worker registers again by itself
    assert client.responses.retrieve(kept.id).output_text == "Persistent."
    chained = create(client, previous_response_id=kept.id, input="SCRIPT:Still chained.")
    assert chained.output_text == "Still chained."


def test_the_workers_output_cap_bounds_requests_and_compactions(fresh_stack, tiny_variant_dir):
    """--max-output-tokens is a ceiling: a request asking for more, and a compaction (whose own
    default is at least 256 tokens), end at the cap, reported as incomplete."""
    fresh_stack.start_gateway()
    fresh_stack.start_worker(str(tiny_variant_dir("qwen")), MODEL, "--context-length", "200000",
                             "--max-output-tokens", "6", scripted=True)
    fresh_stack.wait_for_models(MODEL)
    client = openai.OpenAI(base_url=f"{fresh_stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    long_script = {"chat_template_kwargs": {"test_script": "SCRIPT:" + "word " * 40, "enable_thinking": False}}
    response = client.responses.create(model=MODEL, input="Go on.", max_output_tokens=500, extra_body=long_script)
    assert response.status == "incomplete" and response.usage.output_tokens == 6
    compacted = client.responses.compact(model=MODEL, input=CONVERSATION, extra_body=long_script)
    assert compacted.usage.output_tokens == 6
    # Compactions are counted and timed.
    metrics = httpx.get(f"{fresh_stack.base_url}/metrics", timeout=10).text
    assert f'mlxgw_compactions_total{{model="{MODEL}",outcome="incomplete"}} 1.0' in metrics, metrics  # cut at the cap
    assert f'mlxgw_compaction_seconds_count{{model="{MODEL}"}} 1.0' in metrics
