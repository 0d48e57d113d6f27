"""Server-sent events: the framing, and the one loop that sends any family's event batches.

Each API family builds its events (plain dicts, ``api/generation.py``) without knowing how they
travel; ``event_stream`` sends them as SSE, and ``websocket.py`` is this module's sibling.
Typed events (Responses, Messages) carry their type on an ``event:`` line; Chat Completions'
chunks are bare ``data:`` lines ended by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

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
    and clients such as Codex (``stream_idle_timeout_ms``) from giving up; a timer beside the
    stream sends it, so the per-event path costs nothing extra.
    """

    def __init__(self, content: AsyncGenerator[bytes, None], keepalive_s: float = KEEPALIVE_S,
                 keepalive: bytes = SSE_COMMENT):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content
        self._keepalive_s = keepalive_s
        self._keepalive = keepalive  # a comment line, or an API's own ping event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._content.aclose()

    async def stream_response(self, send: Send) -> None:
        lock = asyncio.Lock()
        last_sent = time.monotonic()
        open_body = False  # between the headers and the last body message

        async def send_and_note(message: Message) -> None:
            nonlocal last_sent, open_body
            async with lock:
                await send(message)
            last_sent = time.monotonic()
            open_body = message["type"] == "http.response.start" or message.get("more_body", False)

        async def keepalive() -> None:
            while True:
                await asyncio.sleep(max(self._keepalive_s - (time.monotonic() - last_sent), 0.01))
                if open_body and time.monotonic() - last_sent >= self._keepalive_s:
                    await send_and_note({"type": "http.response.body", "body": self._keepalive, "more_body": True})

        timer = asyncio.create_task(keepalive())
        try:
            await super().stream_response(send_and_note)
        finally:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
