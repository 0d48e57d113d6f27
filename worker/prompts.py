"""Generate requests -> prompt token ids: the chat template rendered and tokenized, or a raw
prompt tokenized as it is.

Touches no MLX state: the worker builds prompts off the engine thread (a 4 MB prompt takes
seconds to tokenize, and running sequences keep decoding meanwhile).
"""

from __future__ import annotations

import json
from typing import Any

from protocol.messages import ERROR_INVALID_REQUEST, ERROR_TEMPLATE, Error, Generate
from worker.tool_formats import ToolFormat


class PromptBuilder:
    """One model's prompts, from its tokenizer (mlx-lm's wrapper) and tool-call format."""

    def __init__(self, tokenizer: Any, tool_format: ToolFormat | None):
        self.tokenizer = tokenizer
        self.tool_format = tool_format

    def build(self, request: Generate, forced_tool_call: bool) -> list[int] | Error:
        """The prompt's token ids, or the request's error if the template or tokenizer fails."""
        try:
            return self.tokenize(request, forced_tool_call)
        except Exception as exc:  # jinja and tokenizer errors come in many types
            code = ERROR_TEMPLATE if request.messages is not None else ERROR_INVALID_REQUEST
            return Error(code, f"could not build the prompt: {exc}", request.request_id)

    def tokenize(self, request: Generate, forced_tool_call: bool) -> list[int]:
        tokenizer = self.tokenizer
        if request.messages is None:
            return list(tokenizer.encode(request.prompt or ""))
        text = tokenizer.apply_chat_template(
            [template_message(m) for m in request.messages],
            tools=request.tools or None,
            add_generation_prompt=True,
            tokenize=False,
            **request.chat_template_kwargs,
        )
        if forced_tool_call and self.tool_format is not None:
            # tool_choice "required": the reply starts inside a tool call.
            text += self.tool_format.forced_prefix
        # The template writes any BOS itself.
        return list(tokenizer.encode(text, add_special_tokens=False))

    def forces_tool_call(self, request: Generate) -> bool:
        """tool_choice "required" by prefilling the format's opening marker: for formats with no
        grammar (elsewhere the constraint makes the whole reply a call, thinking first if on)."""
        return (request.tool_choice == "required" and bool(request.tools) and self.tool_format is not None
                and self.tool_format.call_syntax is None)

    def initial_state(self, prompt: list[int]) -> str:
        """"reasoning" when the template left a thinking block open for the reply."""
        tokenizer = self.tokenizer
        if tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
            return "reasoning"
        return tokenizer.response_initial_state or "normal"


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """Chat templates index tool-call arguments as a mapping; the APIs carry them as JSON text."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except json.JSONDecodeError:
                arguments = function["arguments"]
            call = {**call, "function": {**function, "arguments": arguments}}
        fixed.append(call)
    return {**message, "tool_calls": fixed}
