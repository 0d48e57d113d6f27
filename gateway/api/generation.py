"""What every generation route does, in order: make and bind its id, submit its
``ModelRequest``, then run the family's event builder over the engine's stream.

Each route: ``family.new_id()``, ``bind_request_id`` (the request's logs and metrics go under
it), convert the body, ``submit`` (an ``EngineError`` from here becomes the API's error reply),
then ``event_batches`` with the family's builder (``ResponseEvents``, ``MessageEvents``,
``ChatChunks``, ``CompletionChunks``): the opening events, the events of each batch of deltas
that arrived together, the closing events, or, if the request fails, the family's error events.
A transport sends the batches (``http/sse.py``, ``http/websocket.py``); a JSON reply
``drain``s them and takes the builder's result. Both stop the generation in the worker when
the client goes away.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import Request

from gateway.api.errors import APIError, EngineError
from gateway.api.family import ApiFamily
from gateway.api.request import ModelRequest, to_generate
from gateway.engine.client import EngineClient, RequestStream
from gateway.http.middleware import caller
from protocol import Delta, Finished
from protocol.logs import current_request_id

log = logging.getLogger(__name__)

T = TypeVar("T")
Event = dict[str, Any]


def bind_request_id(request: Request, resource_id: str, model: str | None = None) -> str:
    """Called by a route once it has made its id: unless the client named the request
    (``x-request-id``, kept by the middleware), that id becomes the request id. Returns the id
    to log under (and to pass to the worker)."""
    state = request.scope.setdefault("state", {})
    if model is not None:
        state["model"] = model
    if not state.get("client_request_id"):
        state["request_id"] = resource_id
        current_request_id.set(resource_id)
    return str(state.get("request_id") or resource_id)


def engine(request: Request) -> EngineClient:
    client: EngineClient = request.app.state.engine
    return client


async def submit(request: Request, model_request: ModelRequest, request_id: str, trace_id: str | None) -> RequestStream:
    """Start it on a worker of its model; raises EngineError if it cannot run."""
    generate = to_generate(model_request, request_id, trace_id, cache_scope=caller(request.scope))
    return await engine(request).submit(model_request.model, generate, model_request.keep_alive)


def needs_load(request: Request, model: str) -> bool:
    """The model is loaded on demand and is not loaded now: its request waits for a load. Such a
    request is admitted here (a full queue: its 429 while an HTTP status can still say so)."""
    client = engine(request)
    if not client.needs_load(model):
        return False
    client.admit(model)
    return True


async def opened_late(open_reply: Callable[[], Awaitable[AsyncGenerator[list[Event], None]]],
                      fail: Callable[[APIError], list[Event]], family: ApiFamily) -> AsyncGenerator[list[Event], None]:
    """A streaming reply whose request waits for its model to load: the stream (and its
    keep-alives) starts now, so a client does not give up during a long load; ``open_reply``
    submits and returns the usual batches. A failure before them (the load failed, or the
    prompt is too long for the model) is the family's error event, since the HTTP status has gone."""
    try:
        batches = await open_reply()
    except EngineError as exc:
        yield fail(family.error(exc))
        return
    except Exception:  # a bug of ours: the client still gets a terminal event, not a cut stream
        log.exception("%s request failed", family.name)
        yield fail(APIError(500, "the gateway had an internal error", "server_error", code="server_error"))
        return
    try:
        async for batch in batches:
            yield batch
    finally:
        await batches.aclose()


class EventBuilder(Protocol):
    failure: APIError | None  # set by fail(): why the reply failed

    def start(self) -> list[Event]: ...

    def add(self, delta: Delta) -> list[Event]: ...

    def finish(self, finished: Finished) -> list[Event]: ...

    def fail(self, error: APIError) -> list[Event]: ...


async def event_batches(builder: EventBuilder, family: ApiFamily,
                        stream: RequestStream | Awaitable[RequestStream]) -> AsyncGenerator[list[Event], None]:
    """``stream``: submitted already, or its submission (awaited after the opening events, so
    a client hears of its request while it waits for a worker)."""
    opened: RequestStream | None = stream if isinstance(stream, RequestStream) else None
    try:
        opening = builder.start()
        if opening:
            yield opening
        if opened is None:
            opened = await stream  # type: ignore[misc]
            assert opened is not None
        async for batch in opened.batches():  # what arrived together goes out in one write
            events = [event for delta in batch for event in builder.add(delta)]
            if events:
                yield events
        assert opened.finished is not None  # batches() ends only at Finished
        yield builder.finish(opened.finished)
    except EngineError as exc:
        yield builder.fail(family.error(exc))
    except Exception:  # a bug of ours: the client still gets a terminal event, not a cut stream
        log.exception("%s request failed", family.name)
        yield builder.fail(APIError(500, "the gateway had an internal error", "server_error", code="server_error"))
    finally:
        if opened is not None:
            opened.close()  # stops the generation if the client went away mid-stream
        elif inspect.iscoroutine(stream):
            stream.close()  # never awaited: the client left before it was submitted


async def with_heartbeats(batches: AsyncGenerator[list[Event], None], heartbeat: Callable[[], list[Event]],
                          every: float) -> AsyncGenerator[list[Event], None]:
    """``batches``, plus ``heartbeat()`` whenever they are silent ``every`` seconds (a long
    prefill or model load). For clients that time out on silence and count only events, not
    SSE comments or WebSocket pings: Codex gives up after 300 s without one."""
    pending: asyncio.Future[list[Event]] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(batches.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                beat = heartbeat()
                if beat:
                    yield beat
                continue
            finished, pending = pending, None
            try:
                batch = finished.result()
            except StopAsyncIteration:
                return
            yield batch
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await batches.aclose()


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


async def drain(batches: AsyncGenerator[list[Event], None], builder: EventBuilder, request: Request) -> None:
    """Run a reply to its end for a JSON answer; raises the failure (the route's error reply),
    or ClientDisconnected if the client left first (the generation is stopped either way)."""

    async def consume() -> None:
        try:
            async for _ in batches:
                pass
        finally:
            await batches.aclose()

    await unless_disconnected(request, consume())
    if builder.failure is not None:
        raise builder.failure
