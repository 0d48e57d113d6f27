"""Every request captured from seven real clients, replayed against the gateway.

The captures (../shared/fixtures/clients) were answered by a mock server; later captures
refer to its ids (previous_response_id, item_reference, GET paths). We make our (scripted)
model produce the same kinds of output the mock returned, map the mock's ids to ours by
position, and require a 200 and a valid stream or object for every request.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest
from conftest import SCRIPTED
from processes import REPO_ROOT, Stack
from responses_sse import check_stream, read_events, sdk_validate_response

MODEL = SCRIPTED
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "clients"
CAPTURES = sorted(FIXTURES.glob("*.json"))

# CI always has shared/ beside the checkout; a developer's machine may not.
pytestmark = pytest.mark.skipif(not CAPTURES and not os.environ.get("CI"), reason=f"no captures in {FIXTURES}")


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


def test_every_captured_request_is_served(stack):
    ids: dict[str, str] = {}  # the mock server's ids -> ours
    seen_clients = set()
    for path in CAPTURES:
        capture = json.loads(path.read_text())
        seen_clients.add(capture["client"].split("-")[0])
        url = stack.base_url + remap(capture["path"], {k: v for k, v in ids.items()})
        for mock_id, our_id in ids.items():
            url = url.replace(mock_id, our_id)
        if capture["method"] == "GET":
            r = httpx.get(url, params=capture.get("query") or None, timeout=60)
            assert r.status_code == 200, f"{path.name}: {r.status_code} {r.text}"
            sdk_validate_response(r.json())
            continue

        expected = mock_output(capture)
        body = remap(capture["body"], ids)
        body["model"] = MODEL
        body["chat_template_kwargs"] = {"test_script": script_for(expected), "enable_thinking": False}
        with httpx.stream("POST", url, json=body, headers={"accept": capture["headers"].get("accept", "*/*")},
                          timeout=120) as r:
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
    assert seen_clients >= {"openai", "agents", "aisdk", "litellm", "llm", "codex"}, seen_clients
