"""WebSocket framing: an event stream as text frames, and errors as error frames.

The sibling of ``sse.py``: the same event objects (``api/events.py``), one JSON text frame
each, in the same order. Close codes say why a connection ends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from starlette.websockets import WebSocket

from gateway.api.errors import APIError

# Close codes (RFC 6455, and the IANA registry's 1013).
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008  # no or wrong API key
CLOSE_TOO_BIG = 1009  # a frame over the size limit
CLOSE_TRY_AGAIN_LATER = 1013  # too many connections
CLOSE_GOING_AWAY = 1001  # the gateway is shutting down


async def send_batches(socket: WebSocket, batches: AsyncGenerator[list[dict[str, Any]], None]) -> None:
    """Every event of ``batches``, a text frame each."""
    try:
        async for batch in batches:
            for event in batch:
                await socket.send_text(_json(event))
    finally:
        await batches.aclose()  # runs the batches' cleanup: stops the generation


def error_frame(error: APIError) -> dict[str, Any]:
    """``{"type": "error", "status", "error": {"type", "code", "message", "param"}}``"""
    return {"type": "error", "status": error.status,
            "error": {"type": error.type, "code": error.code, "message": error.message, "param": error.param}}


async def send_error(socket: WebSocket, error: APIError) -> None:
    await socket.send_text(_json(error_frame(error)))


def _json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
