"""Recorded client requests for the replay tests, from two sources, and the shapes they hold.

- "project": ``tests/fixtures/requests/{responses,claude-code}/*.json``, written for this
  project in its own words (tests/fixtures/requests/README.md). Present in every clone.
- "captures": ``../shared/fixtures/{clients,claude-code}/*.json``, traffic captured from the
  real clients. They hold other vendors' prompts and tool descriptions, so they never enter
  this repository; a clone without ``../shared`` skips their cases (on CI, where
  ``../shared`` is always there, they fail instead).

``MLXGW_SHARED_FIXTURES=<dir>`` stands for ``../shared/fixtures``;
``MLXGW_SHARED_FIXTURES=/nonexistent`` runs the tests as a clone without ``../shared`` does.

A request file: ``method``, ``path`` (Claude Code's holds its query: ``?beta=true``), ``query``
(Responses GETs), ``headers``, ``body`` and what the mock server that answered it replied
(``mock_reply``: Responses output items; for our Messages fixtures, content blocks). The
project's files add ``note`` (what it stands for) and, for requests that refer to an
earlier one's ids (previous_response_id, item_reference, a GET path, an echoed output item),
``needs``: the number prefixes of those files. Requests replay in file-name order.

``responses_shapes`` / ``claude_code_shapes`` name the shapes a request has (fields, item,
part, block and tool types with their keys, header names, tool_choice kinds, ...), never its
text; ``captured-shapes.json`` lists the captures' shapes, and the project's fixtures must
hold every one of them (test_request_fixtures.py). ``python tests/request_fixtures.py``
prints that list from the captures.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
PROJECT_FIXTURES = TESTS / "fixtures" / "requests"
SHARED_FIXTURES = Path(os.environ.get("MLXGW_SHARED_FIXTURES") or TESTS.parent.parent / "shared" / "fixtures")
CAPTURED_SHAPES = PROJECT_FIXTURES / "captured-shapes.json"

RESPONSES, CLAUDE_CODE = "responses", "claude-code"
FOLDERS = {
    RESPONSES: {"project": PROJECT_FIXTURES / "responses", "captures": SHARED_FIXTURES / "clients"},
    CLAUDE_CODE: {"project": PROJECT_FIXTURES / "claude-code", "captures": SHARED_FIXTURES / "claude-code"},
}
# Never sent on: the transport's own, and credentials (the test stack has no keys).
_NOT_FORWARDED = {"host", "content-length", "connection", "accept-encoding", "transfer-encoding", "authorization",
                  "x-api-key"}


def request_files(api: str, source: str) -> list[Path]:
    return sorted(FOLDERS[api][source].glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def captures_missing(api: str) -> str | None:
    """Why the captures' cases skip; None when they run (present, or on CI: there they fail)."""
    if request_files(api, "captures") or os.environ.get("CI"):
        return None
    return f"no captures in {FOLDERS[api]['captures']} (no ../shared beside this clone, or MLXGW_SHARED_FIXTURES)"


def sources(api: str) -> list[Any]:
    """``@pytest.mark.parametrize("source", sources(api))``: the project's, and the captures."""
    reason = captures_missing(api)
    return ["project", pytest.param("captures", marks=pytest.mark.skipif(reason is not None, reason=reason or ""))]


def request_params(api: str) -> list[Any]:
    """One case per request file, "project/NAME" and "captures/NAME"; one skipped
    "captures" case when there are none."""
    params = [pytest.param(path, id=f"project/{path.name}") for path in request_files(api, "project")]
    captured = request_files(api, "captures")
    params += [pytest.param(path, id=f"captures/{path.name}") for path in captured]
    if not captured:
        reason = captures_missing(api)
        params.append(pytest.param(FOLDERS[api]["captures"], id="captures",
                                   marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return params


def forwarded_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _NOT_FORWARDED}


# --- shapes -------------------------------------------------------------------------------


def _keys(value: dict[str, Any], *leave_out: str) -> str:
    return "{" + ",".join(sorted(set(value) - {"type", *leave_out})) + "}"


def _header_shapes(headers: dict[str, str]) -> set[str]:
    shapes = set()
    for name in headers:
        name = name.lower()
        if name in _NOT_FORWARDED - {"authorization", "x-api-key"}:
            continue
        for family in ("x-stainless-", "x-codex-"):
            if name.startswith(family):
                name = family + "*"
        shapes.add(f"header:{name}")
    accept = next((v for k, v in headers.items() if k.lower() == "accept"), None)
    shapes.add(f"accept:{accept}")
    return shapes


def _schema_shapes(where: str, schema: Any) -> set[str]:
    return {f"{where}:$schema"} if isinstance(schema, dict) and "$schema" in schema else set()


def responses_shapes(request: dict[str, Any]) -> set[str]:
    path = request["path"]
    route = "/v1/responses/{id}" if path.startswith("/v1/responses/") else path
    shapes = {f"{request['method']} {route}"} | {f"query:{k}" for k in request.get("query") or {}}
    shapes |= _header_shapes(request.get("headers") or {})
    reply = request.get("mock_reply") or {}
    shapes.add(f"reply:{reply.get('kind')}")
    body = request.get("body") or {}
    if request["method"] != "POST":
        return shapes
    shapes |= {f"field:{k}" for k in body if k not in ("model", "input")}
    for key in ("stream", "store", "parallel_tool_calls"):
        if key in body:
            shapes.add(f"{key}:{json.dumps(body[key])}")
    raw = body.get("input")
    shapes.add("input:string" if isinstance(raw, str) else "input:items")
    for item in raw if isinstance(raw, list) else []:
        kind = item.get("type")
        if kind in (None, "message") and "role" in item:
            content = item.get("content")
            form = "string" if isinstance(content, str) else "parts"
            shapes.add(f"item:{kind or '(no type)'} role={item['role']} content={form} {_keys(item, 'role', 'content')}")
            for part in content if isinstance(content, list) else []:
                shapes.add(f"part:{item['role']}:{part.get('type')}")
            continue
        shapes.add(f"item:{kind or '(no type)'} {_keys(item)}")
        output = item.get("output")
        if kind in ("function_call_output", "custom_tool_call_output"):
            shapes.add(f"item:{kind} output={'string' if isinstance(output, str) else 'parts'}")
        if kind == "reasoning":
            for key in ("summary", "content"):
                for part in item.get(key) or []:
                    shapes.add(f"reasoning-{key}:{part.get('type')}")
    for tool in body.get("tools") or []:
        shapes |= _responses_tool_shapes(tool, "tool")
    choice = body.get("tool_choice")
    if choice is not None:
        shapes.add(f"tool_choice:{choice if isinstance(choice, str) else choice.get('type')}")
    if "include" in body:
        shapes |= {f"include:{v}" for v in body["include"] or ["(empty)"]}
    shapes |= {f"reasoning:{k}" for k in body.get("reasoning") or {}}
    text = body.get("text") or {}
    shapes |= {f"text:{k}" for k in text}
    if "format" in text:
        shapes.add(f"text.format:{text['format'].get('type')} {_keys(text['format'])}")
    for item in (reply.get("response") or {}).get("output") or reply.get("output") or []:
        shapes.add(f"output:{item['type']}")
    return shapes


def _responses_tool_shapes(tool: dict[str, Any], where: str) -> set[str]:
    kind = tool.get("type")
    shapes = {f"{where}:{kind} {_keys(tool)}"} | _schema_shapes(f"{where}:{kind}", tool.get("parameters"))
    if "strict" in tool:
        shapes.add(f"{where}:{kind} strict={json.dumps(tool['strict'])}")
    if kind == "custom" and isinstance(tool.get("format"), dict):
        shapes.add(f"{where}:custom format={tool['format'].get('type')}/{tool['format'].get('syntax')}")
    for member in tool.get("tools") or [] if kind == "namespace" else []:
        shapes |= _responses_tool_shapes(member, f"{where}:namespace>")
    return shapes


def claude_code_shapes(request: dict[str, Any]) -> set[str]:
    path, _, query = request["path"].partition("?")
    shapes = {f"{request['method']} {path}"} | ({f"query:{query}"} if query else set())
    shapes |= _header_shapes(request.get("headers") or {})
    body = request.get("body") or {}
    shapes |= {f"field:{k}" for k in body if k not in ("model", "messages")}
    if "stream" in body:
        shapes.add(f"stream:{json.dumps(body['stream'])}")
    system = body.get("system")
    if isinstance(system, str):
        shapes.add("system:string")
    for block in system if isinstance(system, list) else []:
        shapes.add(f"system:{block.get('type')} {_keys(block)}")
        if str(block.get("text", "")).startswith("x-anthropic-billing-header:"):
            shapes.add("system:billing-header")
    turns = 0
    for message in body.get("messages") or []:
        role, content = message.get("role"), message.get("content")
        if role == "system":
            shapes.add(f"message:system {'after a turn' if turns else 'first'}")
        turns += role != "system"
        shapes.add(f"message:{role} content={'string' if isinstance(content, str) else 'blocks'}")
        for block in content if isinstance(content, list) else []:
            kind = block.get("type")
            shapes.add(f"block:{role}:{kind} {_keys(block)}")
            if kind == "tool_result":
                inner = block.get("content")
                if isinstance(inner, str) or inner is None:
                    shapes.add(f"tool_result-content:{'string' if inner is not None else 'none'}")
                for part in inner if isinstance(inner, list) else []:
                    shapes.add(f"tool_result-content:{part.get('type')}")
                if "is_error" in block:
                    shapes.add(f"tool_result:is_error={json.dumps(block['is_error'])}")
            if kind == "thinking":
                shapes.add(f"block:{role}:thinking text={'yes' if block.get('thinking') else 'empty'}")
    for tool in body.get("tools") or []:
        kind = tool.get("type") or "(no type)"
        shapes.add(f"tool:{kind} {_keys(tool)}")
        shapes |= _schema_shapes(f"tool:{kind}", tool.get("input_schema"))
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        shapes.add(f"tool_choice:{choice.get('type')} {_keys(choice)}")
    for key in ("thinking", "metadata", "output_config"):
        if isinstance(body.get(key), dict):
            kind = body[key].get("type")
            shapes.add(f"{key}:{kind + ' ' if kind else ''}{_keys(body[key])}")
    for edit in (body.get("context_management") or {}).get("edits") or []:
        shapes.add(f"context_management:{edit.get('type')}")
    return shapes


SHAPES = {RESPONSES: responses_shapes, CLAUDE_CODE: claude_code_shapes}


def shapes_of(api: str, source: str) -> dict[str, set[str]]:
    """Each shape -> the files that have it."""
    found: dict[str, set[str]] = {}
    for path in request_files(api, source):
        for shape in SHAPES[api](load(path)):
            found.setdefault(shape, set()).add(path.name)
    return found


if __name__ == "__main__":  # the captures' shapes, for captured-shapes.json
    if any(captures_missing(api) for api in SHAPES):
        sys.exit(f"no captures under {SHARED_FIXTURES}")
    json.dump({api: sorted(shapes_of(api, "captures")) for api in SHAPES}, sys.stdout, indent=1)
    print()
