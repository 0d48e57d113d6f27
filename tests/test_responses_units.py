"""Responses pieces on their own: conversation building, tools, events, the stores."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import APIError
from gateway.responses.conversation import chat_messages, normalize_input
from gateway.responses.events import ResponseEvents
from gateway.responses.objects import ResponseState
from gateway.responses.request import ResponsesRequest
from gateway.responses.store import MemoryStore, SQLiteStore, StoredResponse
from gateway.responses.tools import resolve_tools
from protocol import Delta, Finished, ToolCall


def test_system_and_developer_messages_merge_into_one_leading_system_message():
    items = normalize_input([
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        {"type": "message", "role": "system", "content": "No emoji."},
    ])
    messages = chat_messages("You are helpful.", items)
    assert messages == [
        {"role": "system", "content": "You are helpful.\n\nBe brief.\n\nNo emoji."},
        {"role": "user", "content": "hi"},
    ]


def test_consecutive_calls_merge_and_outputs_match_by_call_id():
    items = normalize_input([
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Two cities."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"city": "A"}'},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"city": "B"}'},
        {"type": "function_call_output", "call_id": "c2", "output": "rain"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "sun"}]},
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
    ])
    messages = chat_messages(None, items)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assistant = messages[1]
    assert assistant["content"] == "Checking." and assistant["reasoning_content"] == "Two cities."
    assert [c["id"] for c in assistant["tool_calls"]] == ["c1", "c2"]
    assert messages[2] == {"role": "tool", "tool_call_id": "c2", "content": "rain", "name": "w"}
    assert messages[3]["content"] == "sun"


def test_normalized_items_get_ids_statuses_and_part_lists():
    (message, call) = normalize_input([
        {"role": "assistant", "content": "hi"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
    ])
    assert message["id"].startswith("msg_") and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": "hi", "annotations": []}]
    assert call["id"].startswith("fc_")
    assert normalize_input("") == []


@pytest.mark.parametrize("bad", [
    [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
    [{"type": "function_call_output", "output": "x"}],
    ["not an object"],
    [{"content": "no role or type"}],
])
def test_bad_input_items_are_400s_naming_the_item(bad):
    with pytest.raises(APIError) as excinfo:
        normalize_input(bad)
    assert excinfo.value.status == 400 and excinfo.value.param.startswith("input[0]")


def test_tools_function_custom_namespace_and_hosted():
    toolset = resolve_tools([
        {"type": "function", "name": "f", "parameters": {"type": "object"}},
        {"type": "custom", "name": "apply_patch"},
        {"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "g"}]},
        {"type": "web_search"}, {"type": "mcp", "server_label": "x"},
    ], "auto", True)
    assert [t["function"]["name"] for t in toolset.template_tools] == ["f", "apply_patch", "g"]
    assert toolset.custom == {"apply_patch"} and toolset.namespaces == {"g": "ns"}
    assert resolve_tools([{"type": "function", "name": "f"}], "none", True).template_tools == []
    named = resolve_tools([{"type": "function", "name": "f"}, {"type": "function", "name": "h"}],
                          {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "h"}]}, True)
    assert [t["function"]["name"] for t in named.template_tools] == ["h"] and named.tool_choice == "required"


def test_events_for_reasoning_text_and_a_call():
    state = ResponseState("resp_1", ResponsesRequest(model="m", input="x"))
    builder = ResponseEvents(state, resolve_tools([{"type": "function", "name": "f"}], "auto", True))
    events = builder.start()
    events += builder.add(Delta("r", reasoning="Hmm"))
    events += builder.add(Delta("r", text="\n\nHello"))
    events += builder.add(Delta("r", text=" world", tool_calls=[ToolCall("call_1", "f", "{}")]))
    events += builder.finish(Finished("r", "stop", 3, 4, reasoning_tokens=1))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [(e["type"], e.get("output_index")) for e in events if "output_item" in e["type"]] == [
        ("response.output_item.added", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.output_item.done", 1),
        ("response.output_item.added", 2), ("response.output_item.done", 2),
    ]
    assert state.output[1]["content"][0]["text"] == "Hello world", "leading blank lines are dropped"
    assert state.output[2]["call_id"] == "call_1" and state.output[2]["id"] != "call_1"
    assert events[-1]["type"] == "response.completed" and state.usage["output_tokens_details"]["reasoning_tokens"] == 1


def test_blank_text_before_a_call_makes_no_message():
    state = ResponseState("resp_1", ResponsesRequest(model="m", input="x"))
    builder = ResponseEvents(state, resolve_tools([{"type": "function", "name": "f"}], "auto", True))
    builder.start()
    builder.add(Delta("r", text="\n"))
    builder.add(Delta("r", tool_calls=[ToolCall("call_1", "f", "{}")]))
    builder.finish(Finished("r", "stop", 1, 1))
    assert [i["type"] for i in state.output] == ["function_call"]


def stored(n: int, size: int = 10) -> StoredResponse:
    return StoredResponse(
        {"id": f"resp_{n}", "output": [{"id": f"msg_out_{n}", "type": "message"}], "pad": "x" * size},
        [{"id": f"msg_in_{n}", "type": "message"}],
        [{"role": "user", "content": "hi"}],
    )


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request, tmp_path):
    def make(**limits):
        if request.param == "memory":
            return MemoryStore(**limits)
        return SQLiteStore(tmp_path / "responses.db", **limits)

    return make


def test_store_round_trip_items_delete_and_count_eviction(make_store):
    async def scenario():
        store = make_store(max_responses=3)
        for n in range(5):
            await store.put(stored(n))
        assert await store.count() == 3
        assert await store.get("resp_0") is None and await store.get_item("msg_in_1") is None
        got = await store.get("resp_4")
        assert got.response["id"] == "resp_4" and got.input_items[0]["id"] == "msg_in_4"
        assert (await store.get_item("msg_out_4"))["type"] == "message"
        assert await store.delete("resp_4") and not await store.delete("resp_4")
        assert await store.get_item("msg_out_4") is None
        await store.close()

    asyncio.run(scenario())


def test_store_evicts_oldest_by_bytes(make_store):
    async def scenario():
        store = make_store(max_bytes=3000)
        for n in range(5):
            await store.put(stored(n, size=1000))
        kept = [n for n in range(5) if await store.get(f"resp_{n}")]
        assert kept == [3, 4]
        await store.close()

    asyncio.run(scenario())


def test_sqlite_store_persists(tmp_path):
    async def scenario():
        store = SQLiteStore(tmp_path / "r.db")
        await store.put(stored(1))
        await store.close()
        reopened = SQLiteStore(tmp_path / "r.db")
        assert (await reopened.get("resp_1")).response["pad"] == "x" * 10
        await reopened.close()

    asyncio.run(scenario())
