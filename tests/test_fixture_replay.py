"""Requests recorded from real clients, replayed against the gateway.

Two sources (tests/request_fixtures.py), one case each: the project's own request fixtures
(tests/fixtures/requests/responses: the shapes seven clients send, in our own words; always)
and the captures of those clients (../shared/fixtures/clients, when ../shared is beside the
clone). ``MLXGW_SHARED_FIXTURES=<dir>`` stands for ../shared/fixtures;
``MLXGW_SHARED_FIXTURES=/nonexistent`` runs as a clone without it: the captures' case skips.

Every request was answered by a mock server; later requests refer to its ids
(previous_response_id, item_reference, GET paths; our fixtures name the files they refer to in
``needs``). We make our (scripted) model produce the same kinds of output the mock returned,
map the mock's ids to ours by position, and require a 200 and a valid stream or object for
every request.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from conftest import SCRIPTED
from processes import Stack
from request_fixtures import RESPONSES, forwarded_headers, load, request_files, sources
from responses_sse import check_stream, read_events, sdk_validate_response

MODEL = SCRIPTED


@pytest.fixture(scope="module")
def stack(scripted_stack: Stack) -> Stack:
    return scripted_stack


def mock_output(capture: dict[str, Any]) -> list[dict[str, Any]]:
    reply = capture.get("mock_reply") or {}
    return (reply.get("response") or {}).get("output") or reply.get("output") or []


def script_for(output: list[dict[str, Any]]) -> str:
    """Model text that our parsers turn into the same kinds of items as the mock's output."""
    parts = []
    for item in output:
        kind = item["type"]
        if kind == "message":
            parts.append("".join(c.get("text", "") for c in item["content"]))
        elif kind == "reasoning":
            text = "".join(s.get("text", "") for s in item.get("summary") or item.get("content") or [])
            parts.append(f"<think>{text}</think>")
        elif kind == "function_call":
            call = {"name": item["name"], "arguments": json.loads(item["arguments"])}
            parts.append(f"<tool_call>{json.dumps(call)}</tool_call>")
        elif kind == "custom_tool_call":
            call = {"name": item["name"], "arguments": {"input": item["input"]}}
            parts.append(f"<tool_call>{json.dumps(call)}</tool_call>")
        else:
            raise AssertionError(f"no script for mock output {kind}")
    return "".join(parts)


def remap(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return ids.get(value, value)
    if isinstance(value, list):
        return [remap(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: remap(v, ids) for k, v in value.items()}
    return value


@pytest.mark.parametrize("source", sources(RESPONSES))
def test_every_request_is_served(stack, source):
    files = request_files(RESPONSES, source)
    assert files, f"no {source} requests"  # on CI, where the captures must be there
    ids: dict[str, str] = {}  # the mock server's ids -> ours
    seen_clients = set()
    replayed: set[str] = set()  # file numbers, for ``needs``
    for path in files:
        capture = load(path)
        seen_clients.add(capture["client"].split("-")[0])
        missing = set(capture.get("needs") or []) - replayed
        assert not missing, f"{path.name} refers to the replies of {sorted(missing)}, not replayed before it"
        replayed.add(path.name.split("-")[0])
        url = stack.base_url + remap(capture["path"], {k: v for k, v in ids.items()})
        for mock_id, our_id in ids.items():
            url = url.replace(mock_id, our_id)
        headers = forwarded_headers(capture["headers"])
        if capture["method"] == "GET":
            r = httpx.get(url, params=capture.get("query") or None, headers=headers, timeout=60)
            assert r.status_code == 200, f"{path.name}: {r.status_code} {r.text}"
            sdk_validate_response(r.json())
            continue

        expected = mock_output(capture)
        body = remap(capture["body"], ids)
        body["model"] = MODEL
        body["chat_template_kwargs"] = {"test_script": script_for(expected), "enable_thinking": False}
        with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as r:
            assert r.status_code == 200, f"{path.name}: {r.status_code} {r.read()}"
            if body.get("stream"):
                assert r.headers["content-type"].startswith("text/event-stream"), path.name
                response = check_stream(read_events(r))
            else:
                response = sdk_validate_response(json.loads(r.read())).model_dump(mode="json")
        assert response["status"] == "completed", f"{path.name}: {response['status']} {response.get('error')}"
        assert [i["type"] for i in response["output"]] == [i["type"] for i in expected], path.name

        mock_response = (capture["mock_reply"] or {}).get("response") or {}
        if mock_response.get("id"):
            ids[mock_response["id"]] = response["id"]
        for mock_item, our_item in zip(expected, response["output"], strict=False):
            ids[mock_item["id"]] = our_item["id"]
            if mock_item.get("call_id") and our_item.get("call_id"):
                # A later output answers this call by its id: ours, as a real client would send.
                ids[mock_item["call_id"]] = our_item["call_id"]
    assert seen_clients >= {"openai", "agents", "aisdk", "litellm", "llm", "codex"}, seen_clients
