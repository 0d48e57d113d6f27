"""What every generation route does once it has built its Generate: submit, then stream or collect.

Each route follows one shape: make the id, ``bind_request_id`` it to the request's logs,
``submit`` (an ``EngineError`` from here becomes the API's error reply), then hand the
stream to an SSE body or ``collect`` it. Both stop the generation in the worker when the
client goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from gateway.engine_client import EngineClient, RequestStream
from protocol import Generate, ToolCall

T = TypeVar("T")


def engine(request: Request) -> EngineClient:
    client: EngineClient = request.app.state.engine
    return client


async def submit(request: Request, model: str, generate: Generate) -> RequestStream:
    """Start ``generate`` on a worker of ``model``; raises EngineError if it cannot run."""
    return await engine(request).submit(model, generate)


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


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Collected:
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


async def collect(stream: RequestStream, request: Request) -> Collected:
    """The whole output; raises EngineError if it fails, ClientDisconnected if the client left
    first (the generation is stopped either way)."""

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

    return await unless_disconnected(request, read())
