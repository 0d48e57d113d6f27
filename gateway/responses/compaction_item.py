"""The ``compaction`` item: its opaque content, and what it means when it comes back.

The item's ``encrypted_content`` is ``ENCRYPTED_PREFIX`` (``mlxgw.compaction.v1:``) followed
by URL-safe base64 of the UTF-8 JSON ``{"summary": "<text>"}``. It is not encrypted: nothing
secret is in it that the client did not send. It is opaque to clients, versioned by the prefix
(a later format gets a new one) and self-contained, so any gateway of this kind can expand it
and a client only has to send it back whole. Content without the prefix (another provider's
encrypted compaction) cannot be read here and is refused with ``invalid_encrypted_content``,
rather than silently dropping the history the client thinks it sent. How one is made:
``compaction.py``.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from gateway.api.errors import APIError
from gateway.api.ids import new_id
from gateway.api.request import Message, text_message
from gateway.http.json_body import has_lone_surrogate, nesting_depth

ENCRYPTED_PREFIX = "mlxgw.compaction.v1:"
_PAYLOAD_DEPTH = 8  # ours is one object with a string in it; a forged one may nest no deeper

# What the model reads before a summary when a compaction item comes back as input.
SUMMARY_PREFIX = (
    "[The earlier part of this conversation was compacted into the summary below, written to "
    "hand the work over. The messages it replaces are no longer shown; continue from it.]\n\n"
)


def encode_summary(summary: str) -> str:
    payload = json.dumps({"summary": summary}, ensure_ascii=False).encode()
    return ENCRYPTED_PREFIX + base64.urlsafe_b64encode(payload).decode("ascii")


def decode_summary(encrypted: Any) -> str:
    """The summary inside ``encrypted_content``; ValueError if it is not ours or is damaged.

    The payload is the client's to forge: it is held to what we write (one shallow object whose
    summary is Unicode text) before anything recurses into it or sends it to a worker."""
    if not isinstance(encrypted, str) or not encrypted.startswith(ENCRYPTED_PREFIX):
        raise ValueError("not made by this server")
    try:
        raw = base64.urlsafe_b64decode(encrypted[len(ENCRYPTED_PREFIX):].encode("ascii"))
        text = raw.decode("utf-8")  # strict: what we write is UTF-8, and surrogates' bytes are refused
        if nesting_depth(raw) > _PAYLOAD_DEPTH:
            raise ValueError("nested too deep")
        payload = json.loads(text)
    except (binascii.Error, UnicodeError, ValueError, RecursionError):
        raise ValueError("damaged") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("summary"), str):
        raise ValueError("damaged")
    if has_lone_surrogate(payload["summary"]):
        raise ValueError("damaged: the summary is not Unicode text")
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


def context_message(item: dict[str, Any]) -> Message:
    """The message a ``compaction`` item becomes, in its place in the conversation.

    A user message, prefixed with a note saying what it is. The summary is a handover written
    for the model that continues, so it must read as information it is given, in the position
    of the history it replaces (anything the client kept before it stays before it, what came
    after it stays after). Not a system message: those are folded into the one leading system
    message (most templates accept no other), which would move the summary out of place; and
    not an assistant message: the model would take it for its own earlier reply (some templates
    also rewrite or drop earlier assistant turns), and it would break the user/assistant
    alternation some templates check less often than a second user message does.
    """
    return text_message("user", SUMMARY_PREFIX + decode_summary(item.get("encrypted_content")))


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
