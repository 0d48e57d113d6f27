"""Responses tools -> chat-template tools, and what the model's calls map back to.

``function`` tools go to the template as they are (in Chat Completions' nested shape).
``namespace`` tools are flattened into their members. ``custom`` (freeform) tools, such as
Codex's ``apply_patch``, become functions with one string argument, ``input``, and calls to
them come back as ``custom_tool_call`` items. Every other type (local_shell, web_search,
tool_search, mcp, ...) runs on OpenAI's side, not ours: it is left out, and logged, never a 400.
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
    """The tools offered, and what the model's calls map back to."""

    tools: list[Tool] = field(default_factory=list)
    custom: set[str] = field(default_factory=set)  # names of freeform tools
    namespaces: dict[str, str] = field(default_factory=dict)  # member name -> namespace
    tool_choice: Literal["auto", "required"] = "auto"
    parallel: bool = True


def resolve_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None) -> ToolSet:
    toolset = ToolSet(parallel=parallel is not False)
    for index, tool in enumerate(tools or []):
        _add_tool(toolset, tool, f"tools[{index}]", namespace=None)
    mode, allowed = _read_tool_choice(tool_choice)
    toolset.tools, toolset.tool_choice = choose_tools(toolset.tools, mode, allowed)
    return toolset


def _add_tool(toolset: ToolSet, tool: dict[str, Any], where: str, namespace: str | None) -> None:
    kind = tool.get("type")
    if kind == "function":
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "a function tool needs a name", param=f"{where}.name")
        schema = tool_schema(tool.get("parameters"), f"{where}.parameters")
        toolset.tools.append(Tool(name, schema, tool.get("description") or "", tool.get("strict") is True))
    elif kind == "custom":
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "a custom tool needs a name", param=f"{where}.name")
        description = tool.get("description") or ""
        parameters = {
            "type": "object",
            "properties": {"input": {"type": "string", "description": "The raw text input for this tool."}},
            "required": ["input"],
        }
        toolset.tools.append(Tool(name, parameters, description))
        toolset.custom.add(name)
    elif kind == "namespace":
        for index, member in enumerate(tool.get("tools") or []):
            if isinstance(member, dict):
                _add_tool(toolset, member, f"{where}.tools[{index}]", tool.get("name"))
        return
    else:
        log.info("tool type %r runs on OpenAI's servers; not offered to a local model", kind)
        return
    if namespace:
        toolset.namespaces[toolset.tools[-1].name] = namespace


def _read_tool_choice(tool_choice: Any) -> tuple[str, set[str] | None]:
    """(mode, the tool names allowed or None for all)."""
    if tool_choice is None or tool_choice == "auto":
        return "auto", None
    if tool_choice in ("none", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict):
        kind = tool_choice.get("type")
        if kind in ("function", "custom") and isinstance(tool_choice.get("name"), str):
            return "required", {tool_choice["name"]}
        if kind == "allowed_tools":
            names = {str(t["name"]) for t in tool_choice.get("tools") or [] if isinstance(t, dict) and t.get("name")}
            mode = "required" if tool_choice.get("mode") == "required" else "auto"
            return mode, names or None
        log.info("tool_choice %r names a hosted tool; treated as auto", kind)
        return "auto", None
    raise APIError(400, f"invalid tool_choice {quoted(tool_choice)}", param="tool_choice")
