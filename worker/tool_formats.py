"""How a model writes tool calls: markers, a parser, and what to prefill to force a call.

mlx-lm's tokenizer wrapper already knows most formats (Hermes/Qwen ``<tool_call>``, Mistral
``[TOOL_CALLS]``, Gemma, GLM, Kimi, ...) from the chat template and brings the matching
``mlx_lm.tool_parsers`` module; we use those as they are. Llama 3's custom-tool format has no
start marker (the reply *is* a JSON object), which mlx-lm does not parse, so we add it here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolFormat:
    start: str  # the marker that opens a call ("" when there is none)
    end: str  # the marker that closes one ("" when a call runs to the end of the reply)
    parse: Callable[[str, Any], Any]  # mlx-lm parser signature: (text, tools) -> call or [calls]
    native: bool  # mlx-lm's own format: its TextStateMachine knows the transitions
    bare_json: bool = False  # a reply that starts with "{" is a call
    prefill: str = ""  # appended to the prompt to force a call (tool_choice "required")

    @property
    def forced_prefix(self) -> str:
        """What the model is made to have written already when a call is forced."""
        return self.prefill or self.start


def parse_llama_json(text: str, tools: Any = None) -> list[dict[str, Any]]:
    """``{"name": ..., "parameters": {...}}`` objects, one or more (separated by ``;`` or newlines)."""
    decoder = json.JSONDecoder()
    calls, position = [], 0
    text = text.strip()
    while position < len(text):
        while position < len(text) and text[position] in " \t\r\n;":
            position += 1
        if position >= len(text):
            break
        value, position = decoder.raw_decode(text, position)
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise ValueError(f"not a tool call: {value!r}")
        arguments = value.get("parameters", value.get("arguments", {}))
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        calls.append({"name": value["name"], "arguments": arguments})
    if not calls:
        raise ValueError("no tool call")
    return calls


LLAMA_JSON = ToolFormat(
    start="<|python_tag|>", end="", parse=parse_llama_json, native=False, bare_json=True, prefill='{"name": "'
)


def detect(tokenizer: Any) -> ToolFormat | None:
    if tokenizer.has_tool_calling:
        return ToolFormat(tokenizer.tool_call_start, tokenizer.tool_call_end or "", tokenizer.tool_parser, native=True)
    template = tokenizer.chat_template
    if isinstance(template, str) and ("<|python_tag|>" in template or '"parameters": ' in template):
        return LLAMA_JSON
    return None
