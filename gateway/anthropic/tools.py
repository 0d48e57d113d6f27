"""Anthropic tools -> chat-template tools, and ``tool_choice`` -> what the worker takes.

Custom tools (``{name, description, input_schema}``, ``type`` absent or "custom") go to the
template as functions. Every other type (``web_search_20250305``, ``bash_20250124``,
``text_editor_...``) is a server tool that runs on Anthropic's side, not ours: left out, and
logged, never a 400. The worker takes "auto" or "required": ``{"type": "none"}`` sends no
tools, ``{"type": "any"}`` is "required", and ``{"type": "tool", "name": X}`` sends only X,
required; ``disable_parallel_tool_use`` comes back as ``parallel=False``.

A ``defer_loading`` tool stays out of the model's context until a ToolSearch result references
it (a ``tool_reference`` block), as on Anthropic's side: Claude Code sends a "never call this"
placeholder that way, and the tools ToolSearch loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.api.errors import APIError
from gateway.api.json_schema import tool_schema
from gateway.api.request import Tool, choose_tools
from gateway.http.json_body import quoted

log = logging.getLogger(__name__)


@dataclass
class ToolSet:
    tools: list[Tool] = field(default_factory=list)  # offered to the model
    tool_choice: Literal["auto", "required"] = "auto"
    parallel: bool = True  # False: disable_parallel_tool_use


def resolve_tools(tools: list[dict[str, Any]] | None, tool_choice: dict[str, Any] | str | None,
                  messages: list[dict[str, Any]]) -> ToolSet:
    found = _read_tools(tools, _referenced_tools(messages))
    mode, named, parallel = _read_tool_choice(tool_choice)
    if named is not None and named not in found:
        raise APIError(400, f"tool_choice names {quoted(named)}, which is not a tool this model can call",
                       param="tool_choice")
    # A deferred tool is offered only when named.
    pool = [tool for tool, deferred in found.values() if named is not None or not deferred]
    offered, choice = choose_tools(pool, mode, None if named is None else {named})
    return ToolSet(offered, choice, parallel)


def _referenced_tools(messages: list[dict[str, Any]]) -> set[str]:
    """Tools a ToolSearch result loaded (``tool_reference`` blocks in a tool_result)."""
    names: set[str] = set()
    for message in messages:
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            inner = block.get("content") if isinstance(block, dict) and block.get("type") == "tool_result" else None
            for ref in inner if isinstance(inner, list) else []:
                if isinstance(ref, dict) and ref.get("type") == "tool_reference" and isinstance(ref.get("tool_name"), str):
                    names.add(ref["tool_name"])
    return names


def _read_tools(tools: list[dict[str, Any]] | None, referenced: set[str]) -> dict[str, tuple[Tool, bool]]:
    """name -> (tool, deferred: not offered unless tool_choice names it)."""
    found: dict[str, tuple[Tool, bool]] = {}
    for index, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise APIError(400, "each tool must be an object", param=f"tools.{index}")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            log.info("tool type %r runs on Anthropic's servers; not offered to a local model", kind)
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "a tool needs a name", param=f"tools.{index}.name")
        schema = tool_schema(tool.get("input_schema"), f"tools.{index}.input_schema")
        deferred = bool(tool.get("defer_loading")) and name not in referenced
        found[name] = (Tool(name, schema, tool.get("description") or "", tool.get("strict") is True), deferred)
    return found


def _read_tool_choice(choice: dict[str, Any] | str | None) -> tuple[str, str | None, bool]:
    """(mode: "auto" | "required" | "none", the one tool named or None, parallel calls allowed)."""
    if choice is None:
        return "auto", None, True
    if isinstance(choice, str):
        choice = {"type": choice}
    if not isinstance(choice, dict):
        raise APIError(400, "tool_choice must be an object", param="tool_choice")
    parallel = not choice.get("disable_parallel_tool_use")
    kind = choice.get("type")
    if kind == "any":
        return "required", None, parallel
    if kind == "none":
        return "none", None, parallel
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "tool_choice of type tool needs a name", param="tool_choice.name")
        return "required", name, parallel
    if kind != "auto":
        log.info("tool_choice type %r is unknown; treated as auto", kind)
    return "auto", None, parallel
