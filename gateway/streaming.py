"""What every generation route does with a worker: start a request, then stream or collect it.

Routes turn the request into a Generate, call ``start``, and then either hand an SSE body
to ``EventStreamResponse`` or ``collect`` the whole text. Both stop the generation in the
worker when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from gateway.engine_client import EngineClient, NoWorker, Overloaded, RequestFailed, RequestStream
from gateway.errors import from_worker_error, model_not_found, overloaded
from protocol import Finished, Generate, ToolCall

SSE_DONE = b"data: [DONE]\n\n"
KEEPALIVE_S = 10.0
T = TypeVar("T")


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + _json(payload) + b"\n\n"


def sse_event(event: dict[str, Any]) -> bytes:
    """A Responses event: its type on the ``event:`` line and inside the data."""
    return b"event: " + event["type"].encode() + b"\ndata: " + _json(event) + b"\n\n"


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


async def start(client: EngineClient, model: str, generate: Generate) -> RequestStream:
    """Submit to a worker of ``model``; errors it reports before generating become HTTP errors."""
    try:
        return await client.submit(model, generate)
    except NoWorker:
        raise model_not_found(model) from None
    except Overloaded as exc:
        raise overloaded(str(exc)) from None
    except RequestFailed as exc:
        raise from_worker_error(exc.error) from None


class ClientDisconnected(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (then ClientDisconnected)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


@dataclass
class Collected:
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


async def collect(stream: RequestStream, request: Request) -> Collected:
    """The whole output; the generation stops if the client disconnects first."""

    async def read() -> Collected:
        out = Collected()
        try:
            async for batch in stream.batches():
                for delta in batch:
                    out.text += delta.text
                    out.reasoning += delta.reasoning
                    out.tool_calls += delta.tool_calls
        finally:
            stream.close()
        return out

    try:
        return await unless_disconnected(request, read())
    except RequestFailed as exc:
        raise from_worker_error(exc.error) from None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """An SSE response whose body generator is always closed, however the connection ends.

    Body generators stop their generation in a ``finally``; closing the generator here runs
    it even when the client vanished while the generator was suspended between chunks.
    During long silences (a long prefill) a comment line keeps proxies and clients such as
    Codex (``stream_idle_timeout_ms``) from giving up; a timer beside the stream sends it, so
    the per-event path costs nothing extra.
    """

    def __init__(self, content: AsyncGenerator[bytes, None], keepalive_s: float = KEEPALIVE_S):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content
        self._keepalive_s = keepalive_s

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
                    await send_and_note({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})

        timer = asyncio.create_task(keepalive())
        try:
            await super().stream_response(send_and_note)
        finally:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)


def finish_reason(finished: Finished | None, made_tool_calls: bool = False) -> str:
    if finished is not None and finished.finish_reason == "length":
        return "length"
    return "tool_calls" if made_tool_calls else "stop"


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
