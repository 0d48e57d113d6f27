"""The Response object: every field the spec lists, null where empty, in JSON and in events.

Strict clients (the Vercel AI SDK, agentgateway, Codex) reject objects with missing fields,
so ``ResponseState.to_dict`` always emits the full set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway.responses.request import ResponsesRequest


@dataclass
class ResponseState:
    """A response as it is built: status, output items, usage."""

    id: str
    request: ResponsesRequest
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "in_progress"
    output: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    completed_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": bool(r.background),
            "completed_at": self.completed_at,
            "error": self.error,
            "incomplete_details": self.incomplete_details,
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "max_tool_calls": r.max_tool_calls,
            "model": r.model,
            "output": list(self.output),
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": r.previous_response_id,
            "presence_penalty": r.presence_penalty or 0.0,
            "frequency_penalty": r.frequency_penalty or 0.0,
            "prompt_cache_key": r.prompt_cache_key,
            "prompt_cache_retention": r.prompt_cache_retention,
            "reasoning": {"effort": None, "summary": None, **(r.reasoning or {})},
            "safety_identifier": r.safety_identifier,
            "service_tier": r.service_tier or "default",
            "store": r.store is not False,
            "temperature": 1.0 if r.temperature is None else r.temperature,
            "text": {"format": {"type": "text"}, "verbosity": "medium", **(r.text or {})},
            "tool_choice": r.tool_choice or "auto",
            "tools": [_echo_tool(t) for t in r.tools or []],
            "top_logprobs": r.top_logprobs or 0,
            "top_p": 1.0 if r.top_p is None else r.top_p,
            "truncation": r.truncation or "disabled",
            "usage": self.usage,
            "user": r.user,
            "metadata": r.metadata or {},
        }


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") == "function":
        return {"parameters": None, "strict": None, **tool}
    return tool


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0,
          cached_tokens_disk: int = 0) -> dict[str, Any]:
    """``cached_tokens_disk``: of the cached tokens, those restored from the worker's disk cache
    (a field of ours, sent only when there are some)."""
    details: dict[str, Any] = {"cached_tokens": cached_tokens, "cache_write_tokens": 0}
    if cached_tokens_disk:
        details["cached_tokens_disk"] = cached_tokens_disk
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": details,
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": prompt_tokens + completion_tokens,
    }
