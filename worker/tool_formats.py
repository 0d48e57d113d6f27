"""How a model writes tool calls: markers, a parser, what to prefill to force a call, and the
call syntax a grammar can write (worker/constraints.py).

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
class CallSyntax:
    """How one tool-call format writes calls, as far as a grammar needs it."""

    open: str  # the marker that opens a call ("" for a bare JSON reply)
    close: str  # the marker that closes it ("" when the call runs to the end of the reply)
    arguments_key: str  # "arguments" or "parameters"
    json_list: bool = False  # Mistral: [call, call]


HERMES_CALLS = CallSyntax("<tool_call>", "</tool_call>", "arguments")
MISTRAL_CALLS = CallSyntax("[TOOL_CALLS]", "", "arguments", json_list=True)
LLAMA_CALLS = CallSyntax("<|python_tag|>", "", "parameters")


@dataclass(frozen=True)
class ToolFormat:
    start: str  # the marker that opens a call ("" when there is none)
    end: str  # the marker that closes one ("" when a call runs to the end of the reply)
    parse: Callable[[str, Any], Any]  # mlx-lm parser signature: (text, tools) -> call or [calls]
    native: bool  # mlx-lm's own format: its TextStateMachine knows the transitions
    bare_json: bool = False  # a reply that starts with "{" is a call
    prefill: str = ""  # appended to the prompt to force a call (tool_choice "required")
    # Calls as a grammar writes them (strict tools, tool_choice "required"); None: not JSON a
    # grammar is written for, so "required" prefills the opening marker instead.
    call_syntax: CallSyntax | None = None

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
    start="<|python_tag|>", end="", parse=parse_llama_json, native=False, bare_json=True, prefill='{"name": "',
    call_syntax=LLAMA_CALLS,
)


def detect(tokenizer: Any) -> ToolFormat | None:
    if tokenizer.has_tool_calling:
        start, end, parse = tokenizer.tool_call_start, tokenizer.tool_call_end or "", tokenizer.tool_parser
        return ToolFormat(start, end, parse, native=True, call_syntax=_native_call_syntax(parse, start, end))
    template = tokenizer.chat_template
    if isinstance(template, str) and ("<|python_tag|>" in template or '"parameters": ' in template):
        return LLAMA_JSON
    return None


def _native_call_syntax(parse: Any, start: str, end: str) -> CallSyntax | None:
    """The call syntax of an mlx-lm format, known by its parser: only Hermes JSON and Mistral's
    JSON list are calls a grammar is written for."""
    from mlx_lm.tool_parsers import json_tools, mistral  # here: the rest of this module needs no mlx

    if parse is json_tools.parse_tool_call and (start, end) == (HERMES_CALLS.open, HERMES_CALLS.close):
        return HERMES_CALLS
    if parse is mistral.parse_tool_call and start == MISTRAL_CALLS.open:
        return MISTRAL_CALLS
    return None
