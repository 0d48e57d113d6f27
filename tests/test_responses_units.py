"""Responses pieces on their own: conversation building, tools, events, the stores."""

from __future__ import annotations

import asyncio

import pytest

from gateway.api.errors import APIError
from gateway.api.request import to_generate
from gateway.chat.request import ChatCompletionRequest, CompletionRequest
from gateway.responses import compaction, compaction_item
from gateway.responses.convert import normalize_input, to_request
from gateway.responses.events import ResponseEvents
from gateway.responses.objects import ResponseState
from gateway.responses.request import ResponsesRequest
from gateway.responses.store import MemoryStore, SQLiteStore, StoredResponse
from gateway.responses.tools import resolve_tools
from protocol import Delta, Finished, SamplingParams, ToolCall


def chat_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """The chat messages the worker gets for a conversation of ``items``."""
    body = ResponsesRequest(model="m", instructions=instructions)
    generate = to_generate(to_request(body, items, resolve_tools(None, "auto", True)), "resp_test")
    assert generate.messages is not None
    return generate.messages


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
    assert [t.name for t in toolset.tools] == ["f", "apply_patch", "g"]
    assert toolset.custom == {"apply_patch"} and toolset.namespaces == {"g": "ns"}
    assert resolve_tools([{"type": "function", "name": "f"}], "none", True).tools == []
    named = resolve_tools([{"type": "function", "name": "f"}, {"type": "function", "name": "h"}],
                          {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "h"}]}, True)
    assert [t.name for t in named.tools] == ["h"] and named.tool_choice == "required"


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


# --- compaction ---------------------------------------------------------------------


def test_compaction_content_round_trips_and_is_versioned():
    summary = "Le café, 日本, and a path: /tmp/x.py\n- next: run the tests"
    encrypted = compaction_item.encode_summary(summary)
    assert encrypted.startswith("mlxgw.compaction.v1:") and summary not in encrypted
    assert compaction_item.decode_summary(encrypted) == summary
    for foreign in ("gAAAAABo_opaque_bytes", "", None, "mlxgw.compaction.v1:!!!", "mlxgw.compaction.v1:e30="):
        with pytest.raises(ValueError):
            compaction_item.decode_summary(foreign)


def test_a_compaction_item_becomes_a_user_message_in_its_place():
    items = normalize_input([
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": "Kept."},
        {"type": "compaction", "encrypted_content": compaction_item.encode_summary("The user wants X.")},
        {"role": "user", "content": "New."},
    ])
    assert items[2]["id"].startswith("cmp_") and "status" not in items[2]
    assert chat_messages("Be terse.", items) == [
        {"role": "system", "content": "Be terse.\n\nRules."},
        {"role": "user", "content": "Kept."},
        {"role": "user", "content": compaction_item.SUMMARY_PREFIX + "The user wants X."},
        {"role": "user", "content": "New."},
    ]


def test_a_compaction_item_we_cannot_read_is_a_400():
    with pytest.raises(APIError) as excinfo:
        normalize_input([{"role": "user", "content": "hi"}, {"type": "compaction", "encrypted_content": "gAAAA_x"}])
    error = excinfo.value
    assert (error.status, error.code, error.param) == (400, "invalid_encrypted_content", "input[1].encrypted_content")


def test_compaction_events_give_exactly_one_item_in_order():
    state = ResponseState("resp_1", ResponsesRequest(model="m", input="x"))
    builder = compaction.CompactionEvents(state)
    events = builder.start()
    events += builder.add(Delta("r", reasoning="Let me see."))
    events += builder.add(Delta("r", text="The user "))
    events += builder.add(Delta("r", text="wants X.", tool_calls=[ToolCall("call_1", "f", "{}")]))
    events += builder.finish(Finished("r", "stop", 30, 4, reasoning_tokens=1))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    # One progress event: the next would come a second later.
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.compaction.compacting", "response.output_item.done", "response.completed"]
    added, done = events[2]["item"], events[4]["item"]
    assert added == {"id": done["id"], "type": "compaction", "encrypted_content": ""}
    assert compaction_item.decode_summary(done["encrypted_content"]) == "The user wants X."
    assert state.output == [done] and state.status == "completed" and state.usage["output_tokens"] == 4


def test_compaction_events_when_the_model_writes_nothing_or_fails():
    # Finished with no text at all: the one item is still owed.
    state = ResponseState("resp_1", ResponsesRequest(model="m", input="x"))
    builder = compaction.CompactionEvents(state)
    events = builder.start() + builder.finish(Finished("r", "stop", 30, 1))
    assert [e["type"] for e in events][2:] == ["response.output_item.added", "response.output_item.done",
                                               "response.completed"]
    # Failed before any output: no item. Failed after some: the announced item is closed.
    state = ResponseState("resp_2", ResponsesRequest(model="m", input="x"))
    builder = compaction.CompactionEvents(state)
    events = builder.start() + builder.fail_with("worker_crashed", "gone")
    assert [e["type"] for e in events][2:] == ["response.failed"] and state.output == []
    state = ResponseState("resp_3", ResponsesRequest(model="m", input="x"))
    builder = compaction.CompactionEvents(state)
    events = builder.start() + builder.add(Delta("r", text="Half")) + builder.fail_with("worker_crashed", "gone")
    assert [e["type"] for e in events][-2:] == ["response.output_item.done", "response.failed"]
    assert compaction_item.decode_summary(state.output[0]["encrypted_content"]) == "Half"


def test_a_chain_from_a_compacting_response_keeps_only_the_item_and_the_instructions():
    context = normalize_input([
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": "Long history."},
        {"role": "assistant", "content": "Long answer."},
        {"type": "compaction_trigger"},
    ])
    item = compaction_item.compaction_item("Summary.")
    assert compaction_item.carried_history(context, [item]) == [context[0], item]
    answer = [{"type": "message", "role": "assistant", "content": []}]
    assert compaction_item.carried_history(context, answer) == context + answer
    assert compaction.triggered(context) and not compaction.triggered(context[:-1]) and not compaction.triggered([])


# --- penalties ----------------------------------------------------------------------


def test_penalties_reach_the_sampling_params_and_the_response_object():
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                 presence_penalty=0.5, frequency_penalty=-1)
    assert chat.sampling() == SamplingParams(presence_penalty=0.5, frequency_penalty=-1.0)
    assert CompletionRequest(model="m", prompt="x", frequency_penalty=2).sampling().frequency_penalty == 2.0
    bodies = {ChatCompletionRequest: {"messages": [{"role": "user", "content": "hi"}]},
              CompletionRequest: {"prompt": "x"}, ResponsesRequest: {"input": "x"}}
    for body, fields in bodies.items():
        fields = {"model": "m", **fields}
        body.model_validate(fields)
        for name in ("presence_penalty", "frequency_penalty"):
            with pytest.raises(ValueError, match=name):
                body.model_validate({**fields, name: 2.5})
    echoed = ResponseState("resp_1", ResponsesRequest(model="m", presence_penalty=1.5)).to_dict()
    assert (echoed["presence_penalty"], echoed["frequency_penalty"]) == (1.5, 0.0)
    tools = [{"type": "function", "name": "f", "parameters": {}, "strict": True}, {"type": "function", "name": "g"}]
    echoed = ResponseState("resp_1", ResponsesRequest(model="m", tools=tools)).to_dict()
    assert [t["strict"] for t in echoed["tools"]] == [True, None]


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


def test_item_ids_are_per_key(make_store):
    """A client names its input items: another key's item with the same id must not replace it."""
    async def scenario():
        store = make_store()
        mine = StoredResponse({"id": "resp_a", "output": []}, [{"id": "msg_x", "type": "message", "text": "A's"}], [],
                              owner="key-a")
        theirs = StoredResponse({"id": "resp_b", "output": []}, [{"id": "msg_x", "type": "message", "text": "B's"}], [],
                                owner="key-b")
        await store.put(mine)
        await store.put(theirs)
        assert (await store.get_item("msg_x", "key-a"))["text"] == "A's"
        assert (await store.get_item("msg_x", "key-b"))["text"] == "B's"
        assert await store.delete("resp_b", "key-b")
        assert (await store.get_item("msg_x", "key-a"))["text"] == "A's" and await store.get_item("msg_x", "key-b") is None
        # One key sending the same id again: the later response holds it, deleting the earlier keeps it.
        await store.put(StoredResponse({"id": "resp_a2", "output": []}, [{"id": "msg_x", "type": "message", "text": "A2"}],
                                       [], owner="key-a"))
        assert await store.delete("resp_a", "key-a")
        assert (await store.get_item("msg_x", "key-a"))["text"] == "A2"
        await store.close()

    asyncio.run(scenario())


def test_a_store_from_before_per_key_items_keeps_its_items(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE responses (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, size INTEGER NOT NULL, response TEXT NOT NULL,
                                input_items TEXT NOT NULL, context TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '');
        CREATE TABLE items (id TEXT PRIMARY KEY, response_id TEXT NOT NULL, item TEXT NOT NULL);
        INSERT INTO responses VALUES ('resp_1', 1, 10, '{"id": "resp_1", "output": []}', '[]', '[]', 'key-a');
        INSERT INTO items VALUES ('msg_1', 'resp_1', '{"id": "msg_1", "type": "message"}');
    """)
    db.close()

    async def scenario():
        store = SQLiteStore(path)
        assert (await store.get_item("msg_1", "key-a"))["id"] == "msg_1" and await store.get_item("msg_1") is None
        await store.close()

    asyncio.run(scenario())
