"""What every generation route does with a worker: start a request, then stream or collect it.

Routes turn the request into a Generate, call ``start``, and then either hand an SSE body
to ``EventStreamResponse`` or ``collect`` the whole text. Both stop the generation in the
worker when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.engine_client import EngineClient, NoWorker, RequestFailed, RequestStream
from gateway.errors import from_worker_error, model_not_found
from protocol import Finished, Generate

SSE_DONE = b"data: [DONE]\n\n"


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def start(client: EngineClient, model: str, generate: Generate) -> RequestStream:
    """Submit to a worker of ``model``; errors it reports before generating become HTTP errors."""
    try:
        return await client.submit(model, generate)
    except NoWorker:
        raise model_not_found(model) from None
    except RequestFailed as exc:
        raise from_worker_error(exc.error) from None


class ClientDisconnected(Exception):
    pass


async def collect(stream: RequestStream, request: Request) -> str:
    """The whole output text; cancels the generation if the client disconnects first."""

    async def read() -> str:
        return "".join([delta.text async for delta in stream])

    reading = asyncio.ensure_future(read())
    watching = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({reading, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not reading.done():
            reading.cancel()
        stream.close()
    if not reading.done() or reading.cancelled():
        raise ClientDisconnected()
    try:
        return reading.result()
    except RequestFailed as exc:
        raise from_worker_error(exc.error) from None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """An SSE response that always runs ``on_close``, however the connection ends."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def finish_reason(finished: Finished | None) -> str:
    if finished is not None and finished.finish_reason == "length":
        return "length"
    return "stop"


def usage(finished: Finished | None) -> dict[str, Any]:
    """The ``usage`` object of Chat Completions and Completions."""
    prompt = finished.prompt_tokens if finished else 0
    completion = finished.completion_tokens if finished else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": finished.cached_tokens if finished else 0},
    }
