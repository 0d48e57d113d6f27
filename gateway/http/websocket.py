"""WebSocket framing: an event stream as text frames, and errors as error frames.

The sibling of ``sse.py``: the same event objects (``api/generation.py``), one JSON text frame
each, in the same order. Close codes say why a connection ends.

Every frame to a socket goes through its ``FrameSender``: one at a time, in order, and
watched. A client that stops reading fills the socket's buffers, and then a send waits; once
one has waited ``send_timeout`` seconds the sender says the connection has ``stalled``, and
the route stops the client's generation and closes it (``CLOSE_POLICY``): it would otherwise
run to its end for nobody, holding a place in the batch. What such a client can leave unsent
is bounded too: ``bound_send_buffer`` caps the kernel's send buffer at ``SEND_BUFFER_BYTES``
(Linux grows it to megabytes on a fast link), so a stall shows after at most ~2 x 256 KB
(the kernel doubles it) + uvicorn's 64 KB of unread frames, not after minutes of output.

ASGI exposes no transport; under uvicorn the middleware finds it (``state["transport"]``),
elsewhere both bounds fall back to the server's own behaviour.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

from starlette.websockets import WebSocket

from gateway.api.errors import APIError
from gateway.http.sse import SEND_BUFFER_BYTES as SSE_SEND_BUFFER_BYTES
from gateway.http.sse import bound_send_buffer as bound_transport_buffer

# Close codes (RFC 6455, and the IANA registry's 1013).
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008  # no or wrong API key; a client that stopped reading its stream
CLOSE_TOO_BIG = 1009  # a frame over the size limit
CLOSE_TRY_AGAIN_LATER = 1013  # too many connections
CLOSE_GOING_AWAY = 1001  # the gateway is shutting down

SEND_TIMEOUT_S = 30.0
SEND_BUFFER_BYTES = SSE_SEND_BUFFER_BYTES


class FrameSender:
    """The one way frames go out on ``socket``: serialized, and each send watched (``watch``)."""

    def __init__(self, socket: WebSocket, send_timeout: float = SEND_TIMEOUT_S):
        self.socket = socket
        self.send_timeout = send_timeout
        self.stalled = asyncio.Event()  # a send waited send_timeout seconds: the client is not reading
        self._lock = asyncio.Lock()
        self._sending_since: float | None = None

    async def send(self, payload: dict[str, Any]) -> None:
        text = _json(payload)
        async with self._lock:
            self._sending_since = asyncio.get_running_loop().time()
            try:
                await self.socket.send_text(text)
            finally:
                self._sending_since = None

    async def send_error(self, error: APIError) -> None:
        await self.send(error_frame(error))

    async def watch(self) -> None:
        """Run beside the connection: sets ``stalled`` once a send has waited too long (never
        with a ``send_timeout`` of 0). A send that completes at once (the usual case) costs
        nothing but two assignments."""
        if self.send_timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        interval = min(1.0, self.send_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            since = self._sending_since
            if since is not None and loop.time() - since >= self.send_timeout:
                self.stalled.set()
                return


async def send_batches(sender: FrameSender, batches: AsyncGenerator[list[dict[str, Any]], None]) -> None:
    """Every event of ``batches``, a text frame each."""
    try:
        async for batch in batches:
            for event in batch:
                await sender.send(event)
    finally:
        await batches.aclose()  # runs the batches' cleanup: stops the generation


def bound_send_buffer(socket: WebSocket, size: int = SEND_BUFFER_BYTES) -> None:
    """Cap the kernel's send buffer of ``socket``'s connection at ``size`` bytes."""
    transport = _transport(socket)
    if transport is not None:
        bound_transport_buffer(transport, size)


async def drop_stalled(socket: WebSocket, reason: str, grace_s: float = 2.0) -> None:
    """Close a connection whose client stopped reading. The close frame waits behind everything
    unsent; if it cannot go out within ``grace_s`` the connection is dropped at once (its
    transport aborted), freeing its buffers, instead of lingering until the client reads or goes."""
    try:
        await asyncio.wait_for(socket.close(CLOSE_POLICY, reason), grace_s)
        return
    except asyncio.TimeoutError:
        pass
    except Exception:  # the socket went meanwhile: nothing left to close
        return
    transport = _transport(socket)
    if transport is not None:
        transport.abort()


def _transport(socket: WebSocket) -> asyncio.Transport | None:
    transport: asyncio.Transport | None = socket.scope.get("state", {}).get("transport")
    return transport


def error_frame(error: APIError) -> dict[str, Any]:
    """``{"type": "error", "status", "error": {"type", "code", "message", "param"}}``"""
    return {"type": "error", "status": error.status,
            "error": {"type": error.type, "code": error.code, "message": error.message, "param": error.param}}


def _json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
