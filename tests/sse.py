"""Reading Chat Completions / Completions SSE streams in tests."""

from __future__ import annotations

import json
from typing import Any

import httpx


def read_sse(response: httpx.Response) -> tuple[list[dict[str, Any]], bool]:
    """All ``data:`` payloads of a stream, and whether it ended with ``[DONE]``."""
    events: list[dict[str, Any]] = []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return events, True
        events.append(json.loads(data))
    return events, False


def chat_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))


def stream_chat(base_url: str, body: dict[str, Any], timeout: float = 60) -> tuple[list[dict[str, Any]], bool]:
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return read_sse(r)
