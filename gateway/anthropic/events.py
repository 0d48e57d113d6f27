"""Worker output -> an Anthropic Message and its stream events.

``MessageEvents`` is fed the worker's deltas and returns plain event dicts with a ``type``
(the SSE sender writes ``event: <type>``), in the order the Messages API streams them:

    message_start (the Message with empty content),
    per block: content_block_start -> content_block_delta... -> content_block_stop,
    message_delta (stop_reason, stop_sequence, final usage), message_stop.

Blocks are strictly sequential and ``index`` is the block's place in the final ``content``.
``message()`` gives the whole Message from the same state, so the JSON reply and the stream
can never disagree. It is the family's event builder (``api/generation.py``); how events travel,
and pings, are the transport's business.

Thinking blocks carry a ``signature`` (``signature.py``) that clients send back untouched.

usage follows Anthropic: ``input_tokens`` is the prompt NOT served from cache, so that
``input_tokens + cache_read_input_tokens + cache_creation_input_tokens`` is the whole prompt.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from gateway.anthropic.signature import thinking_signature
from gateway.api.errors import APIError, anthropic_type
from gateway.api.ids import new_id
from protocol import Delta, Finished, ToolCall

log = logging.getLogger(__name__)

Event = dict[str, Any]


def usage(prompt_tokens: int, cached_tokens: int, output_tokens: int, thinking_tokens: int = 0,
          cached_tokens_disk: int = 0) -> dict[str, Any]:
    """``cached_tokens_disk``: of the cache reads, those restored from the worker's disk cache
    (``cache_read_input_tokens_disk``, a field of ours, sent only when there are some)."""
    cached = min(max(cached_tokens, 0), prompt_tokens)
    result: dict[str, Any] = {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
                              "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}
    if cached_tokens_disk:
        result["cache_read_input_tokens_disk"] = min(cached_tokens_disk, cached)
    if thinking_tokens:
        result["output_tokens_details"] = {"thinking_tokens": thinking_tokens}
    return result


class MessageEvents:
    """One Message as it is built. ``prompt_tokens``: the prompt's length, known once the
    worker accepted it; ``parallel=False`` keeps only the first tool call
    (``disable_parallel_tool_use``); ``omit_thinking`` sends thinking only in signatures."""

    def __init__(self, message_id: str, model: str, prompt_tokens: int = 0, parallel: bool = True,
                 omit_thinking: bool = False):
        self.id = message_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.failure: APIError | None = None
        self._parallel = parallel
        self._omit_thinking = omit_thinking
        self.content: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage = usage(0, 0, 0)
        self._open: int | None = None  # index of the text or thinking block still growing
        self._thinking = ""  # the open thinking block's text, for its signature
        self._calls = 0

    def start(self, prompt_tokens: int | None = None, cached_tokens: int = 0) -> list[Event]:
        """``cached_tokens`` may not be known yet (the worker says in ``Finished``): the
        ``message_delta`` at the end carries the final usage, which clients take over."""
        self.usage = usage(self.prompt_tokens if prompt_tokens is None else prompt_tokens, cached_tokens, 0)
        return [{"type": "message_start", "message": self.message()}]

    def add(self, delta: Delta) -> list[Event]:
        events: list[Event] = []
        if delta.reasoning:
            events += self._append("thinking", delta.reasoning)
        if delta.text:
            events += self._append("text", delta.text)
        for call in delta.tool_calls:
            events += self._tool_use(call)
        return events

    def finish(self, finished: Finished, stop_sequence_hit: str | None = None) -> list[Event]:
        """``stop_sequence_hit``: the stop sequence that ended generation (by default the one
        the worker reports; without one a stop there reads as ``end_turn``). A tool call wins
        over every other reason: the client must run it."""
        if stop_sequence_hit is None:
            stop_sequence_hit = finished.stop_sequence
        events = self._close()
        if self._calls:
            self.stop_reason = "tool_use"
        elif finished.finish_reason == "length":
            self.stop_reason = "max_tokens"
        elif stop_sequence_hit is not None:
            self.stop_reason = "stop_sequence"
        else:  # "stop", and "cancelled" (no one is reading by then: there is no better word)
            self.stop_reason = "end_turn"
        self.stop_sequence = stop_sequence_hit if self.stop_reason == "stop_sequence" else None
        self.usage = usage(finished.prompt_tokens, finished.cached_tokens, finished.completion_tokens,
                           finished.reasoning_tokens, finished.cached_tokens_disk)
        delta = {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence}
        return events + [{"type": "message_delta", "delta": delta, "usage": dict(self.usage)},
                         {"type": "message_stop"}]

    def fail(self, error: APIError) -> list[Event]:
        self.failure = error
        return [self.error(anthropic_type(error), error.message)]

    def error(self, type: str, message: str) -> Event:
        """An in-stream error (e.g. ``overloaded_error``, ``api_error``); the stream ends after it."""
        return {"type": "error", "error": {"type": type, "message": message}}

    def message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": copy.deepcopy(self.content), "stop_reason": self.stop_reason,
                "stop_sequence": self.stop_sequence, "usage": copy.deepcopy(self.usage)}

    # --- blocks -------------------------------------------------------------------------

    def _append(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self.content[self._open]["type"] != kind:
            if not text.strip():
                return []  # blank output between blocks (e.g. before a tool call) is no block
            events += self._close()
            text = text.lstrip()
            empty = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""}
            events += self._start(empty)
            self._open = len(self.content) - 1
        block = self.content[self._open]
        if kind == "text":
            block["text"] += text
            return events + [self._delta({"type": "text_delta", "text": text})]
        self._thinking += text
        if self._omit_thinking:
            return events
        block["thinking"] += text
        return events + [self._delta({"type": "thinking_delta", "thinking": text})]

    def _tool_use(self, call: ToolCall) -> list[Event]:
        if self._calls and not self._parallel:
            log.info("tool call %s dropped: disable_parallel_tool_use allows one per message", call.name)
            return []
        self._calls += 1
        events = self._close()
        tool_input = _tool_input(call.arguments)
        events += self._start({"type": "tool_use", "id": new_id("toolu", 24), "name": call.name, "input": {}})
        index = len(self.content) - 1
        self.content[index]["input"] = tool_input
        partial = {"type": "input_json_delta", "partial_json": json.dumps(tool_input, ensure_ascii=False)}
        return events + [{"type": "content_block_delta", "index": index, "delta": partial},
                         {"type": "content_block_stop", "index": index}]

    def _start(self, block: dict[str, Any]) -> list[Event]:
        self.content.append(block)
        return [{"type": "content_block_start", "index": len(self.content) - 1, "content_block": dict(block)}]

    def _delta(self, delta: dict[str, Any]) -> Event:
        return {"type": "content_block_delta", "index": self._open, "delta": delta}

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        events: list[Event] = []
        block = self.content[self._open]
        if block["type"] == "thinking":
            block["signature"] = thinking_signature(self._thinking)
            self._thinking = ""
            events.append(self._delta({"type": "signature_delta", "signature": block["signature"]}))
        events.append({"type": "content_block_stop", "index": self._open})
        self._open = None
        return events


def _tool_input(arguments: str) -> dict[str, Any]:
    """``input`` must be an object: other JSON, or text that is not JSON, goes in ``input``."""
    try:
        parsed = json.loads(arguments)
    except (json.JSONDecodeError, TypeError):
        return {"input": arguments}
    return parsed if isinstance(parsed, dict) else {"input": parsed}
