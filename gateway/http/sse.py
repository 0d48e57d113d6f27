"""Server-sent events: the framing, and the one loop that sends any family's event batches.

Each API family builds its events (plain dicts, ``api/generation.py``) without knowing how they
travel; ``event_stream`` sends them as SSE, and ``websocket.py`` is this module's sibling.
Typed events (Responses, Messages) carry their type on an ``event:`` line; Chat Completions'
chunks are bare ``data:`` lines ended by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
SSE_COMMENT = b": keep-alive\n\n"
KEEPALIVE_S = 10.0


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + _json(payload) + b"\n\n"


def sse_event(event: dict[str, Any]) -> bytes:
    """A typed event (Responses, Messages): its type on the ``event:`` line and inside the data."""
    return b"event: " + event["type"].encode() + b"\ndata: " + _json(event) + b"\n\n"


def event_stream(batches: AsyncGenerator[list[dict[str, Any]], None], typed: bool = True, done: bool = False,
                 keepalive: bytes = SSE_COMMENT, every: float = KEEPALIVE_S) -> EventStreamResponse:
    """A streaming reply of ``batches``, one write per batch; ``done``: end with ``[DONE]``;
    ``keepalive``: what is sent through silences of ``every`` seconds (a comment, or the API's
    ping event)."""
    frame = sse_event if typed else sse_data
    return EventStreamResponse(_frames(batches, frame, SSE_DONE if done else b""), keepalive_s=every,
                               keepalive=keepalive)


def keepalive_interval(request: Request) -> float:
    """Seconds of silence before a stream gets a keep-alive (gateway --keepalive)."""
    return float(getattr(request.app.state, "keepalive_s", KEEPALIVE_S))


async def _frames(batches: AsyncGenerator[list[dict[str, Any]], None], frame: Callable[[dict[str, Any]], bytes],
                  end: bytes) -> AsyncGenerator[bytes, None]:
    try:
        async for batch in batches:
            if batch:
                yield b"".join(frame(event) for event in batch)
    finally:
        await batches.aclose()  # runs the batches' cleanup: stops the generation
    if end:
        yield end


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


class EventStreamResponse(StreamingResponse):
    """An SSE response whose body generator is always closed, however the connection ends.

    Body generators stop their generation in a ``finally``; closing the generator here runs
    it even when the client vanished while the generator was suspended between chunks.
    During long silences (a long prefill) a comment line (or the API's ping event) keeps proxies
    from giving up; a timer beside the stream sends it, so the per-event path costs nothing extra.
    The same timer watches the sends: a client that reads nothing fills its connection's buffers
    and a send waits; once one has waited the gateway's send timeout (``--send-timeout``, the
    app's ``state.send_timeout``) the connection is dropped, which ends the stream and stops its
    generation, instead of decoding on for nobody.
    """

    def __init__(self, content: AsyncGenerator[bytes, None], keepalive_s: float = KEEPALIVE_S,
                 keepalive: bytes = SSE_COMMENT):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content
        self._keepalive_s = keepalive_s
        self._keepalive = keepalive  # a comment line, or an API's own ping event
        self._send_timeout = 0.0  # 0: wait for the client forever
        self._transport: asyncio.Transport | None = None
        self._stalled = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")
        self._send_timeout = float(getattr(getattr(app, "state", None), "send_timeout", 0.0) or 0.0)
        self._transport = scope.get("state", {}).get("transport")
        if self._transport is not None and self._send_timeout > 0:
            bound_send_buffer(self._transport)
        try:
            await super().__call__(scope, receive, send)
        except Exception:
            if not self._stalled:
                raise
            # Dropped for reading nothing: a send that waited may fail, and that is the point.
        finally:
            await self._content.aclose()

    async def stream_response(self, send: Send) -> None:
        lock = asyncio.Lock()
        last_sent = time.monotonic()
        sending_since: float | None = None
        open_body = False  # between the headers and the last body message

        async def send_and_note(message: Message) -> None:
            nonlocal last_sent, open_body, sending_since
            async with lock:
                sending_since = time.monotonic()
                try:
                    await send(message)
                finally:
                    sending_since = None
            last_sent = time.monotonic()
            open_body = message["type"] == "http.response.start" or message.get("more_body", False)

        async def keepalive() -> None:
            """Keep-alives through silences, sent from their own task, so that this one stays free
            to watch every send (a keep-alive's too) for a client that reads nothing."""
            beat: asyncio.Task | None = None
            try:
                while True:
                    now = time.monotonic()
                    since = sending_since
                    if since is not None:
                        if self._send_timeout > 0 and now - since >= self._send_timeout:
                            self._stalled = True
                            log.warning("a client read nothing of its stream for %.0f s: dropping it and stopping "
                                        "its generation", self._send_timeout)
                            if self._transport is not None:
                                self._transport.abort()
                            return
                        wait = self._send_timeout - (now - since) if self._send_timeout > 0 else self._keepalive_s
                    else:
                        if open_body and now - last_sent >= self._keepalive_s and (beat is None or beat.done()):
                            beat = asyncio.create_task(send_and_note(
                                {"type": "http.response.body", "body": self._keepalive, "more_body": True}))
                            await asyncio.sleep(0)  # let it start (and mark itself sending)
                            continue
                        wait = self._keepalive_s - (now - last_sent)
                    await asyncio.sleep(max(wait, 0.05))
            finally:
                if beat is not None and not beat.done():
                    beat.cancel()

        timer = asyncio.create_task(keepalive())
        try:
            await super().stream_response(send_and_note)
        finally:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)


SEND_BUFFER_BYTES = 256 << 10


def bound_send_buffer(transport: asyncio.Transport, size: int = SEND_BUFFER_BYTES) -> None:
    """Cap the kernel's send buffer of the connection (Linux grows it to megabytes), so that a
    client that stops reading shows as a waiting send within seconds."""
    raw = transport.get_extra_info("socket")
    if raw is None:
        return
    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError:
        pass
