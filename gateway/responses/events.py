"""Worker output -> Responses output items and stream events.

``ResponseEvents`` is fed the worker's deltas and returns plain event dicts (``type``,
``sequence_number`` and the payload), in the order the Responses API prescribes:

    response.created, response.in_progress,
    per item: output_item.added -> its content events -> output_item.done,
    exactly one of response.completed | response.incomplete | response.failed.

Items are strictly sequential, ``output_index`` counts every item, ``content_index`` is per
item. The same builder serves non-streaming requests (the events are dropped and the final
``state`` is returned), so JSON and stream can never disagree. It is the family's event
builder (``api/generation.py``); how events travel (SSE, WebSocket) is the transport's business.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from gateway.api.errors import APIError
from gateway.api.ids import new_id
from gateway.responses.objects import ResponseState, usage
from gateway.responses.tools import ToolSet
from protocol import Delta, Finished, ToolCall

Event = dict[str, Any]


@dataclass
class _OpenItem:
    kind: str  # "message" | "reasoning"
    id: str
    output_index: int
    text: str = ""


class ResponseEvents:
    def __init__(self, state: ResponseState, tools: ToolSet, reasoning_round_trip: bool = False):
        self.state = state
        self._tools = tools
        self._reasoning_round_trip = reasoning_round_trip  # include=["reasoning.encrypted_content"]
        self.failure: APIError | None = None  # why it failed, if the engine said so
        self._sequence = 0
        self._open: _OpenItem | None = None
        self._calls = 0

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> list[Event]:
        self.state.status = "in_progress"
        snapshot = self.state.to_dict()
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def add(self, delta: Delta) -> list[Event]:
        events: list[Event] = []
        if delta.reasoning:
            events += self._append_text("reasoning", delta.reasoning)
        if delta.text:
            events += self._append_text("message", delta.text)
        for call in delta.tool_calls:
            events += self._tool_call(call)
        return events

    def finish(self, finished: Finished) -> list[Event]:
        incomplete = finished.finish_reason == "length"
        events = self._close(incomplete)
        state = self.state
        state.usage = usage(finished.prompt_tokens, finished.completion_tokens,
                            finished.cached_tokens, finished.reasoning_tokens, finished.cached_tokens_disk)
        if incomplete:
            state.status = "incomplete"
            state.incomplete_details = {"reason": "max_output_tokens"}
            return events + [self._terminal("response.incomplete")]
        state.status = "completed"
        state.completed_at = int(time.time())
        return events + [self._terminal("response.completed")]

    def cancel(self) -> list[Event]:
        """Stopped on request: no terminal event exists for this; the status says it."""
        events = self._close(incomplete=True)
        self.state.status = "cancelled"
        return events

    def fail(self, error: APIError) -> list[Event]:
        self.failure = error
        return self.fail_with(error.code or "server_error", error.message)

    def fail_with(self, code: str, message: str) -> list[Event]:
        events = self._close(incomplete=True)
        self.state.status = "failed"
        self.state.error = {"code": code, "message": message}
        return events + [self._terminal("response.failed")]

    # --- items ------------------------------------------------------------------------

    def _append_text(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self._open.kind != kind:
            if kind == "message" and not text.strip():
                return []  # blank text between items (e.g. before a tool call) is no message
            events += self._close(incomplete=False)
            events += self._open_item(kind)
            if kind == "message":
                text = text.lstrip()
        item = self._open
        assert item is not None  # opened above
        item.text += text
        delta_type = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        events.append(self._event(delta_type, item_id=item.id, output_index=item.output_index,
                                  content_index=0, delta=text, **extra))
        return events

    def _open_item(self, kind: str) -> list[Event]:
        prefix = "msg" if kind == "message" else "rs"
        item = _OpenItem(kind, new_id(prefix), len(self.state.output))
        self._open = item
        if kind == "message":
            added = {"id": item.id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        else:
            added = {"id": item.id, "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        return [
            self._event("response.output_item.added", output_index=item.output_index, item=added),
            self._event("response.content_part.added", item_id=item.id, output_index=item.output_index,
                        content_index=0, part=part),
        ]

    def _close(self, incomplete: bool) -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        where = {"item_id": item.id, "output_index": item.output_index, "content_index": 0}
        done: dict[str, Any]
        if item.kind == "message":
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": item.text}
            done = {"id": item.id, "type": "message", "status": "incomplete" if incomplete else "completed",
                    "role": "assistant", "content": [part]}
            text_done = self._event("response.output_text.done", **where, text=item.text, logprobs=[])
        else:
            part = {"type": "reasoning_text", "text": item.text}
            done = {"id": item.id, "type": "reasoning", "summary": [], "content": [part],
                    "encrypted_content": item.text if self._reasoning_round_trip else None,
                    "status": "completed"}
            text_done = self._event("response.reasoning_text.done", **where, text=item.text)
        self.state.output.append(done)
        return [
            text_done,
            self._event("response.content_part.done", **where, part=part),
            self._event("response.output_item.done", output_index=item.output_index, item=done),
        ]

    def _tool_call(self, call: ToolCall) -> list[Event]:
        if self._calls >= 1 and not self._tools.parallel:
            return []  # parallel_tool_calls=false: one call per response
        self._calls += 1
        events = self._close(incomplete=False)
        output_index = len(self.state.output)
        if call.name in self._tools.custom:
            item_id = new_id("ctc")
            text = _custom_input(call.arguments)
            base = {"id": item_id, "type": "custom_tool_call", "call_id": call.id, "name": call.name}
            done = {**base, "status": "completed", "input": text}
            events += [
                self._event("response.output_item.added", output_index=output_index,
                            item={**base, "status": "in_progress", "input": ""}),
                self._event("response.custom_tool_call_input.delta", item_id=item_id, output_index=output_index, delta=text),
                self._event("response.custom_tool_call_input.done", item_id=item_id, output_index=output_index, input=text),
            ]
        else:
            item_id = new_id("fc")
            base = {"id": item_id, "type": "function_call", "call_id": call.id, "name": call.name}
            namespace = self._tools.namespaces.get(call.name)
            if namespace:
                base["namespace"] = namespace
            done = {**base, "status": "completed", "arguments": call.arguments}
            events += [
                self._event("response.output_item.added", output_index=output_index,
                            item={**base, "status": "in_progress", "arguments": ""}),
                self._event("response.function_call_arguments.delta", item_id=item_id, output_index=output_index,
                            delta=call.arguments),
                self._event("response.function_call_arguments.done", item_id=item_id, output_index=output_index,
                            arguments=call.arguments, name=call.name),
            ]
        self.state.output.append(done)
        events.append(self._event("response.output_item.done", output_index=output_index, item=done))
        return events

    # --- plumbing ---------------------------------------------------------------------

    def heartbeat(self) -> list[Event]:
        """Through a long silence (prefill, a model load): the response as it stands, again.
        Codex counts only events against its idle timeout; SSE comments do not reset it."""
        if self.state.status not in ("queued", "in_progress"):
            return []  # ended: a heartbeat after the terminal event would start a phantom response
        return [self._event("response.in_progress", response=self.state.to_dict())]

    def _terminal(self, kind: str) -> Event:
        return self._event(kind, response=self.state.to_dict())

    def _event(self, kind: str, **payload: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **payload}
        self._sequence += 1
        return event


def _custom_input(arguments: str) -> str:
    """A freeform tool is offered to the model as a function with one string argument, "input"."""
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    if isinstance(parsed, dict) and isinstance(parsed.get("input"), str):
        return parsed["input"]
    return arguments
