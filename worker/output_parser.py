"""Split one request's decoded text into visible content, reasoning and tool calls.

Markers are matched on text with mlx-lm's ``TextStateMachine``, so a marker split across
several tokens (``<tool`` + ``_call>``) is recognised, and text that might begin a marker is
held back until the next token settles it. A tool call is parsed when its block closes (or
when the reply ends, for formats with no end marker) with the format's parser; a block that
does not parse is passed on as plain text rather than lost.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.generate import TextStateMachine, make_text_state_machine

from protocol import ToolCall
from worker.tool_formats import ToolFormat

log = logging.getLogger(__name__)

NORMAL, REASONING, TOOL = "normal", "reasoning", "tool"


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


class OutputParser:
    def __init__(
        self,
        tokenizer: Any,
        tool_format: ToolFormat | None,
        tools: list[dict[str, Any]] | None,
        initial_state: str = NORMAL,
        forced_tool_call: bool = False,
    ):
        # Without tools in the request, tool markers are plain text.
        self._format = tool_format if tools else None
        self._tools = tools
        machine = _state_machine(tokenizer, self._format)
        self._state = machine.make_state(TOOL if forced_tool_call else initial_state)
        self._previous = self._state[0]
        self._tool_text = self._format.prefill if forced_tool_call and self._format else ""
        # Llama-style formats: a reply whose first non-blank character is "{" is a call.
        self._deciding_bare_json = bool(self._format and self._format.bare_json and not forced_tool_call)
        self._in_bare_json = False
        self._leading = ""

    @property
    def state(self) -> str:
        return self._state[0] or NORMAL

    def feed(self, text: str) -> Parsed:
        self._state, segments = TextStateMachine.split(self._state, text)
        return self._collect(segments)

    def finish(self) -> Parsed:
        """The reply ended: release held-back text and parse an unterminated call."""
        self._state, held, state = TextStateMachine.flush(self._state)
        parsed = self._collect([(state, held)])
        if self._in_bare_json or (self.state == TOOL and self._tool_text):
            parsed.content += self._close_tool_block(parsed.tool_calls)
        elif self._deciding_bare_json:
            parsed.content += self._leading
        return parsed

    def _collect(self, segments: list[tuple[str | None, str]]) -> Parsed:
        parsed = Parsed()
        for state, text in segments:
            state = state or NORMAL
            if state == REASONING:
                parsed.reasoning += text
            elif state == TOOL:
                self._tool_text += text
            else:
                if self._previous == TOOL:
                    parsed.content += self._close_tool_block(parsed.tool_calls)
                parsed.content += self._content(text)
            self._previous = state
        return parsed

    def _content(self, text: str) -> str:
        if self._in_bare_json:
            self._tool_text += text
            return ""
        if not self._deciding_bare_json:
            return text
        self._leading += text
        stripped = self._leading.lstrip()
        if not stripped:
            return ""
        self._deciding_bare_json = False
        if stripped.startswith("{"):
            self._in_bare_json = True
            self._tool_text = stripped
            return ""
        return self._leading

    def _close_tool_block(self, calls: list[ToolCall]) -> str:
        """Parse the finished block into ``calls``; return it as text if it is no call."""
        text, self._tool_text = self._tool_text, ""
        self._in_bare_json = False
        fmt = self._format
        assert fmt is not None  # a tool block opens only when there is a format
        try:
            result = fmt.parse(text, self._tools)
            parsed = result if isinstance(result, list) else [result]
            new_calls = [_tool_call(call) for call in parsed]
        except Exception as exc:  # parsers raise ValueError, JSONDecodeError, KeyError, ...
            log.info("model output is not a valid tool call (%s: %s); passing it on as text", type(exc).__name__, exc)
            return text if fmt.bare_json else fmt.start + text
        calls.extend(new_calls)
        return ""


def _tool_call(call: dict[str, Any]) -> ToolCall:
    name = call["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool call without a name: {call!r}")
    arguments = call.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=arguments)


def _state_machine(tokenizer: Any, tool_format: ToolFormat | None) -> TextStateMachine:
    if tool_format is None or tool_format.native:
        if tool_format is None and tokenizer.has_tool_calling:
            return _custom_state_machine(tokenizer, None)
        return make_text_state_machine(tokenizer)
    return _custom_state_machine(tokenizer, tool_format)


def _custom_state_machine(tokenizer: Any, tool_format: ToolFormat | None) -> TextStateMachine:
    transitions: dict[str, list[tuple[str, str]]] = {NORMAL: []}
    if tokenizer.has_thinking:
        transitions[NORMAL].append((tokenizer.think_start, REASONING))
        transitions[REASONING] = [(tokenizer.think_end, NORMAL)]
    if tool_format is not None:
        transitions[NORMAL].append((tool_format.start, TOOL))
        if tokenizer.has_thinking:
            transitions[REASONING].append((tool_format.start, TOOL))
        transitions[TOOL] = [(tool_format.end, NORMAL)] if tool_format.end else []
    return TextStateMachine(transitions)
