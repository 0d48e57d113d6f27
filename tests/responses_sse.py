"""Reading and checking Responses streams and objects in tests.

``check_stream`` is our own validator of the Responses SSE contract (it runs over every
stream the tests produce); ``sdk_validate_*`` run the official SDK's strict pydantic types.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from openai._models import validate_type
from openai.types.responses import Response, ResponseStreamEvent

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


def read_events(response: httpx.Response) -> list[dict[str, Any]]:
    """Parse ``event:``/``data:`` SSE into event dicts, checking the two lines agree."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            event = json.loads(line[len("data: "):])
            assert event.get("type") == name, f"event line {name!r} vs data type {event.get('type')!r}"
            events.append(event)
            name = None
        else:
            assert line == "" or line.startswith(":"), f"unexpected SSE line {line!r}"
    return events


def post_stream(base_url: str, body: dict[str, Any], timeout: float = 120) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{base_url}/v1/responses", json={**body, "stream": True}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return read_events(r)


def sdk_validate_response(obj: dict[str, Any]) -> Response:
    return validate_type(type_=Response, value=obj)


def sdk_validate_event(event: dict[str, Any]) -> None:
    validate_type(type_=ResponseStreamEvent, value=event)


def check_stream(events: list[dict[str, Any]], sdk_strict: bool = True) -> dict[str, Any]:
    """Check the ordering and indexing rules; return the final response object."""
    assert events, "empty stream"
    assert [e["sequence_number"] for e in events] == list(range(len(events))), "sequence numbers"
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["output"] == [] and events[0]["response"]["usage"] is None
    terminals = [i for i, e in enumerate(events) if e["type"] in TERMINAL]
    assert terminals == [len(events) - 1], f"exactly one terminal event, last: {[e['type'] for e in events]}"
    response_id = events[0]["response"]["id"]

    done_items: list[dict[str, Any]] = []
    open_item: dict[str, Any] | None = None
    open_part: int | None = None
    text = ""
    for event in events[2:-1]:
        kind = event["type"]
        assert "response" not in event or event["response"]["id"] == response_id
        if kind == "response.output_item.added":
            assert open_item is None, "items must not overlap"
            assert event["output_index"] == len(done_items), "output_index counts every item"
            open_item, open_part, text = event["item"], None, ""
            if open_item["type"] == "compaction":  # has no status; its content comes whole in done
                assert open_item["encrypted_content"] == ""
            else:
                assert open_item["status"] == "in_progress"
            continue
        assert open_item is not None, f"{kind} outside an item"
        if kind == "response.output_item.done":
            assert open_part is None, "content part left open"
            item = event["item"]
            assert event["output_index"] == len(done_items)
            assert item["id"] == open_item["id"] and item["type"] == open_item["type"]
            if item["type"] == "function_call":
                assert item["id"] != item["call_id"], "id and call_id must differ"
                json.loads(item["arguments"])
            done_items.append(item)
            open_item = None
            continue
        assert event["item_id"] == open_item["id"] and event["output_index"] == len(done_items)
        if kind == "response.content_part.added":
            assert open_part is None
            open_part, text = event["content_index"], ""
            assert open_part == 0, "content_index restarts at 0 in every item"
        elif kind == "response.content_part.done":
            assert event["content_index"] == open_part and event["part"]["text"] == text
            open_part = None
        elif kind in ("response.output_text.delta", "response.reasoning_text.delta"):
            assert event["content_index"] == open_part == 0
            text += event["delta"]
        elif kind in ("response.output_text.done", "response.reasoning_text.done"):
            assert event["content_index"] == open_part and event["text"] == text
        elif kind in ("response.function_call_arguments.delta", "response.custom_tool_call_input.delta"):
            text += event["delta"]
        elif kind == "response.function_call_arguments.done":
            assert event["arguments"] == text and event["name"] == open_item["name"]
        elif kind == "response.custom_tool_call_input.done":
            assert event["input"] == text
        elif kind == "response.compaction.compacting":
            assert open_item["type"] == "compaction"
        else:
            raise AssertionError(f"unexpected event {kind}")
    assert open_item is None, "an item was never closed"

    final = events[-1]["response"]
    assert final["output"] == done_items, "the terminal response's output must equal the done items"
    status = {"response.completed": "completed", "response.incomplete": "incomplete",
              "response.failed": "failed"}[events[-1]["type"]]
    assert final["status"] == status
    if status != "failed":
        assert final["usage"]["total_tokens"] == final["usage"]["input_tokens"] + final["usage"]["output_tokens"]
    if sdk_strict:
        for event in events:
            sdk_validate_event(event)
        sdk_validate_response(final)
    return final
