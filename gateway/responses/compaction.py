"""Compaction: the model summarises a conversation into one opaque ``compaction`` item, and a
later request that carries the item gets the summary back in the model's context.

Two ways in, one summarising path:

- ``POST /v1/responses/compact`` (``compact``): answers a ``response.compaction`` object
  (the SDK's ``CompactedResponse``) whose ``output`` is that one item.
- A ``/v1/responses`` request whose input ends with ``{"type": "compaction_trigger"}``
  (Codex's newer form): an ordinary response, streamed or not, whose output is exactly one
  ``compaction`` item instead of an answer.

``compact`` is the second form with the trigger appended and ``store: false``. Either way
``ResponsesService.prepare`` renders the conversation as for any turn (so the worker's prefix
cache already holds all of it), ``summarise_instead`` appends one user message asking for the
summary, and ``CompactionEvents`` turns the reply into the item: ``output_item.added`` (with an
empty ``encrypted_content``), ``response.compaction.compacting`` while the summary is written
(at most one a second: it carries no text, and keeps idle timeouts away), ``output_item.done``
with the whole item, then the terminal event.

The item's ``encrypted_content`` is ``ENCRYPTED_PREFIX`` (``mlxgw.compaction.v1:``) followed
by URL-safe base64 of the UTF-8 JSON ``{"summary": "<text>"}``. It is not encrypted: nothing
secret is in it that the client did not send. It is opaque to clients, versioned by the prefix
(a later format gets a new one) and self-contained, so any gateway of this kind can expand it
and a client only has to send it back whole. Content without the prefix (another provider's
encrypted compaction) cannot be read here and is refused with ``invalid_encrypted_content``,
rather than silently dropping the history the client thinks it sent.

OpenAI documents the compacted output as the user messages followed by the compaction item,
but the SDK's types accept only assistant messages in ``output``, and a local model's window is
small: here the item alone stands for the whole conversation, and the summary prompt asks the
model to restate what the user asked for.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import APIError
from gateway.responses.events import Event, ResponseEvents
from gateway.responses.objects import ResponseState, new_id
from gateway.responses.request import ResponsesRequest
from gateway.responses.tools import ToolSet
from protocol import Delta

if TYPE_CHECKING:
    from gateway.responses.service import ResponsesService, Run

log = logging.getLogger(__name__)

ENCRYPTED_PREFIX = "mlxgw.compaction.v1:"
TRIGGER = "compaction_trigger"
SUMMARY_MAX_TOKENS = 4096  # unless the request sets max_output_tokens: a summary, not a novel
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
# What the model reads before a summary when a compaction item comes back as input.
SUMMARY_PREFIX = (
    "[The earlier part of this conversation was compacted into the summary below, written to "
    "hand the work over. The messages it replaces are no longer shown; continue from it.]\n\n"
)


# --- the item and its content --------------------------------------------------------


def encode_summary(summary: str) -> str:
    payload = json.dumps({"summary": summary}, ensure_ascii=False).encode()
    return ENCRYPTED_PREFIX + base64.urlsafe_b64encode(payload).decode("ascii")


def decode_summary(encrypted: Any) -> str:
    """The summary inside ``encrypted_content``; ValueError if it is not ours or is damaged."""
    if not isinstance(encrypted, str) or not encrypted.startswith(ENCRYPTED_PREFIX):
        raise ValueError("not made by this server")
    try:
        payload = json.loads(base64.urlsafe_b64decode(encrypted[len(ENCRYPTED_PREFIX):].encode("ascii")))
    except (binascii.Error, UnicodeError, ValueError):
        raise ValueError("damaged") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("summary"), str):
        raise ValueError("damaged")
    return payload["summary"]


def compaction_item(summary: str, item_id: str | None = None) -> dict[str, Any]:
    """The SDK's ``ResponseCompactionItem``: ``{id, type: "compaction", encrypted_content}``."""
    return {"id": item_id or new_id("cmp"), "type": "compaction", "encrypted_content": encode_summary(summary)}


def checked_input_item(item: dict[str, Any], index: int) -> dict[str, Any]:
    """A ``compaction`` input item, validated (a 400 before any work if we cannot read it), with an id."""
    try:
        decode_summary(item.get("encrypted_content"))
    except ValueError as exc:
        raise APIError(400, f"The compaction item's encrypted_content could not be read ({exc}); only "
                       "compaction items made by this server can be sent back to it.",
                       param=f"input[{index}].encrypted_content", code="invalid_encrypted_content") from None
    return {**item, "type": "compaction", "id": item.get("id") or new_id("cmp")}


def context_message(item: dict[str, Any]) -> dict[str, Any]:
    """The chat message a ``compaction`` item becomes, in its place in the conversation.

    A user message, prefixed with a note saying what it is. The summary is a handover written
    for the model that continues, so it must read as information it is given, in the position
    of the history it replaces (anything the client kept before it stays before it, what came
    after it stays after). Not a system message: conversation.py folds those into the one
    leading system message (most templates accept no other), which would move the summary out
    of place; and not an assistant message: the model would take it for its own earlier reply
    (some templates also rewrite or drop earlier assistant turns), and it would break the
    user/assistant alternation some templates check less often than a second user message does.
    """
    return {"role": "user", "content": SUMMARY_PREFIX + decode_summary(item.get("encrypted_content"))}


# --- summarising: shared by both forms -----------------------------------------------


def triggered(items: list[dict[str, Any]]) -> bool:
    """Whether a request's (normalized) input asks for a compaction: its last item is the trigger."""
    return bool(items) and items[-1].get("type") == TRIGGER


def summarise_instead(run: Run, body: ResponsesRequest) -> None:
    """Turn a prepared run into a compaction: same context, plus the request for a summary.

    The conversation is rendered exactly as for an ordinary turn (instructions, tools and all),
    so its prompt extends the previous turn's and the prefix cache serves everything but the
    summary request. ``tool_choice`` goes back to "auto": the model must write text.
    """
    if not any(item.get("type") != TRIGGER for item in run.context):
        raise APIError(400, "There is nothing to compact: the input holds no conversation.", param="input")
    generate = run.generate
    generate.messages = [*(generate.messages or []), {"role": "user", "content": SUMMARY_PROMPT}]
    generate.tool_choice = "auto"
    generate.constraint = None  # a summary is text, whatever format the turn asked for
    generate.max_tokens = body.max_output_tokens or SUMMARY_MAX_TOKENS
    run.builder = CompactionEvents(run.state)


def carried_history(context: list[dict[str, Any]], output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a ``previous_response_id`` continuation inherits from the response it names.

    Normally its whole context and output. When that response compacted (its output is a
    compaction item), the item replaces the conversation it summarised, as in a client's
    history after ``/responses/compact``; system and developer messages, the standing
    instructions that the summary is not asked to restate, stay ahead of it.
    """
    if not any(item.get("type") == "compaction" for item in output):
        return context + output
    kept = [item for item in context if item.get("type") == "message" and item.get("role") in ("system", "developer")]
    return kept + output


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


async def compact(service: ResponsesService, body: CompactRequest, response_id: str,
                  trace_id: str | None = None, owner: str = "") -> dict[str, Any]:
    """Summarise ``body``'s conversation: the ``response.compaction`` object.

    Raises APIError for a bad request and EngineError when the engine fails (the app's
    handlers render both in OpenAI's shape, with ``param`` "input" for the prompt)."""
    raw = body.input
    items = ([{"role": "user", "content": raw}] if raw else []) if isinstance(raw, str) else list(raw)
    fields = body.model_dump(exclude_unset=True)
    fields.update(input=[*items, {"type": TRIGGER}], stream=False, background=False, store=False)
    try:
        request = ResponsesRequest.model_validate(fields)
    except ValidationError as exc:  # a field of ours the compact body left loose
        raise APIError(400, f"invalid request: {exc.errors()[0].get('msg')}") from None
    run = await service.prepare(request, response_id, trace_id, owner=owner)
    async for _ in service.events(run):
        pass
    if run.failure is not None:
        raise run.failure
    state = run.state
    if state.status == "failed":  # a gateway bug, already logged
        raise APIError(500, (state.error or {}).get("message") or "compaction failed", "server_error",
                       code="server_error")
    return {
        "id": state.id,
        "object": "response.compaction",
        "created_at": state.created_at,
        "output": list(state.output),
        "usage": state.usage,
    }
