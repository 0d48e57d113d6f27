"""Compaction: the model summarises a conversation into one opaque ``compaction`` item, and a
later request that carries the item gets the summary back in the model's context.

Two ways in, one summarising path:

- ``POST /v1/responses/compact``: answers a ``response.compaction`` object
  (the SDK's ``CompactedResponse``) whose ``output`` is that one item.
- A ``/v1/responses`` request whose input ends with ``{"type": "compaction_trigger"}``
  (Codex's newer form): an ordinary response, streamed or not, whose output is exactly one
  ``compaction`` item instead of an answer.

The route answers ``/compact`` as the second form with the trigger appended and ``store:
false`` (``compact_body``). Either way ``ResponsesService.prepare`` renders the conversation as
for any turn (so the worker's prefix cache already holds all of it), ``summary_run``
appends one user message asking for the summary, and ``CompactionEvents`` turns the reply
into the item: ``output_item.added`` (with an empty ``encrypted_content``),
``response.compaction.compacting`` while the summary is written
(at most one a second: it carries no text, and keeps idle timeouts away), ``output_item.done``
with the whole item, then the terminal event.

The item itself, its content and its meaning as input: ``compaction_item.py``.

OpenAI documents the compacted output as the user messages followed by the compaction item,
but the SDK's types accept only assistant messages in ``output``, and a local model's window is
small: here the item alone stands for the whole conversation, and the summary prompt asks the
model to restate what the user asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.api.errors import APIError
from gateway.api.ids import new_id
from gateway.api.request import ModelRequest, text_message
from gateway.api.structured_output import instruction
from gateway.responses.compaction_item import compaction_item
from gateway.responses.events import Event, ResponseEvents
from gateway.responses.objects import ResponseState
from gateway.responses.request import ResponsesRequest
from gateway.responses.tools import ToolSet
from protocol import Delta

log = logging.getLogger(__name__)

TRIGGER = "compaction_trigger"
# Unless the request sets max_output_tokens, the summary is at most as long as the conversation
# it stands for (a longer one is of no use, and a small model under greedy decoding can repeat
# itself until the cap: two short messages must not cost minutes), between these two bounds.
SUMMARY_MAX_TOKENS = 4096  # a summary, not a novel
SUMMARY_MIN_TOKENS = 256  # room for the few lines the summary prompt asks for
CHARS_PER_TOKEN = 4  # the usual rate for English text; only the budget depends on it
PROGRESS_INTERVAL_S = 1.0

# Our own wording, in the spirit of Codex's local compaction prompt.
SUMMARY_PROMPT = (
    "Stop here and compact this conversation. Write a summary that lets another assistant, who "
    "will see only your summary and not the conversation, carry on the work seamlessly. Include:\n"
    "- what the user asked for, in their own words where short, with their constraints and preferences;\n"
    "- what has been done so far, and the decisions made;\n"
    "- the state of files, commands and tool results that still matter;\n"
    "- what remains to be done, as concrete next steps;\n"
    "- names, paths, values, errors and snippets needed to continue.\n"
    "Be concise and structured. Write only the summary, and do not call any tool."
)


# --- summarising: shared by both forms -----------------------------------------------


def summary_run(items: list[dict[str, Any]], context: list[dict[str, Any]], request: ModelRequest,
                body: ResponsesRequest, state: ResponseState) -> tuple[ModelRequest, CompactionEvents] | None:
    """If the input asks for a compaction (its last item is the trigger): the request for the
    summary and the builder that turns it into the one item; else None.

    The conversation is rendered exactly as for an ordinary turn (instructions, tools and all),
    so its prompt extends the previous turn's and the prefix cache serves everything but the
    summary request. ``tool_choice`` goes back to "auto": the model must write text.
    """
    if not triggered(items):
        return None
    if not any(item.get("type") != TRIGGER for item in context):
        raise APIError(400, "There is nothing to compact: the input holds no conversation.", param="input")
    summary = dataclasses.replace(
        request,
        messages=[*request.messages, text_message("user", SUMMARY_PROMPT)],
        # The turn's format instruction stays in the system prompt (the prompt the cache holds),
        # but the summary is text, whatever format the turn asked for.
        system=[*request.system, *filter(None, [instruction(request.constraint)])],
        tool_choice="auto",
        constraint=None,
        max_tokens=body.max_output_tokens or summary_budget(request),
    )
    return summary, CompactionEvents(state)


def summary_budget(request: ModelRequest) -> int:
    """The summary's default length in tokens: the conversation's, estimated from its text
    (messages, thinking, tool calls and results; not the instructions or the tools, which a
    later request sends again), within ``SUMMARY_MIN_TOKENS``..``SUMMARY_MAX_TOKENS``."""
    chars = sum(len(message.text) + len(message.reasoning)
                + sum(len(call.name) + len(str(call.arguments)) for call in message.tool_calls)
                for message in request.messages)
    return max(SUMMARY_MIN_TOKENS, min(SUMMARY_MAX_TOKENS, chars // CHARS_PER_TOKEN))


def triggered(items: list[dict[str, Any]]) -> bool:
    """Whether a request's (normalized) input asks for a compaction: its last item is the trigger."""
    return bool(items) and items[-1].get("type") == TRIGGER


class CompactionEvents(ResponseEvents):
    """Worker output -> exactly one ``compaction`` item, in the Responses event order."""

    def __init__(self, state: ResponseState):
        super().__init__(state, ToolSet())
        self._item_id = new_id("cmp")
        self._output_index = len(state.output)
        self._text = ""
        self._reasoning = ""
        self._announced = False
        self._closed = False
        self._finishing = False
        self._last_progress = float("-inf")

    @property
    def summary(self) -> str:
        # A thinking model that spent its budget thinking has said something, at least.
        return self._text.strip() or self._reasoning.strip()

    def add(self, delta: Delta) -> list[Event]:
        self._text += delta.text
        self._reasoning += delta.reasoning
        if delta.tool_calls:
            log.info("response %s: the model called a tool while summarising; ignored", self.state.id)
        events = self._announce()
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            events.append(self._event("response.compaction.compacting", item_id=self._item_id,
                                      output_index=self._output_index))
        return events

    def finish(self, finished: Any) -> list[Event]:
        self._finishing = True  # the one item is owed even if the model wrote nothing
        return super().finish(finished)

    def _announce(self) -> list[Event]:
        if self._announced:
            return []
        self._announced = True
        added = {"id": self._item_id, "type": "compaction", "encrypted_content": ""}
        return [self._event("response.output_item.added", output_index=self._output_index, item=added)]

    def _close(self, incomplete: bool) -> list[Event]:
        # finish: the item, always. fail / cancel: close it only if it was announced (a partial
        # summary, as a cut-off message is kept), so that every added item gets its done.
        if self._closed or not (self._announced or self._finishing):
            return []
        self._closed = True
        events = self._announce()
        item = compaction_item(self.summary, self._item_id)
        self.state.output.append(item)
        events.append(self._event("response.output_item.done", output_index=self._output_index, item=item))
        return events


# --- POST /v1/responses/compact ------------------------------------------------------


class CompactRequest(BaseModel):
    """The body of ``POST /v1/responses/compact``; lenient like ``ResponsesRequest``."""

    model_config = ConfigDict(extra="allow", strict=True)  # "4" is no number, "yes" no boolean

    model: str
    input: str | list[dict[str, Any]] = Field(default_factory=list)
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool | None = True
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


def compact_body(body: CompactRequest) -> ResponsesRequest:
    """A ``/responses/compact`` body as the ``/responses`` request that answers it: its input
    with the trigger appended, not stored, not streamed."""
    raw = body.input
    items = ([{"role": "user", "content": raw}] if raw else []) if isinstance(raw, str) else list(raw)
    fields = body.model_dump(exclude_unset=True)
    fields.update(input=[*items, {"type": TRIGGER}], stream=False, background=False, store=False)
    try:
        return ResponsesRequest.model_validate(fields)
    except ValidationError as exc:  # a field of ours the compact body left loose
        raise APIError(400, f"invalid request: {exc.errors()[0].get('msg')}") from None


def compacted_response(state: ResponseState) -> dict[str, Any]:
    """The ``response.compaction`` object (the SDK's ``CompactedResponse``)."""
    return {
        "id": state.id,
        "object": "response.compaction",
        "created_at": state.created_at,
        "output": list(state.output),
        "usage": state.usage,
    }
