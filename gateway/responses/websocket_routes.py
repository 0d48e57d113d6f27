"""The Responses API over a WebSocket: ``GET /v1/responses`` upgraded (Codex's preferred transport).

Each client frame ``{"type": "response.create", ...the POST body...}`` runs one response; its
events go out one text frame each, the same objects in the same order as over SSE. One
response at a time per connection: frames that arrive meanwhile wait their turn. The
connection keeps its last response, so ``previous_response_id`` continues from it even with
``store: false``; a failed response (or an unknown id) drops that. A client that closes the
socket stops its generation at once. Bad frames get an ``error`` frame and the connection
stays open; only the key check (middleware), the connection limit and the frame size close it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError

from gateway.api.errors import APIError, EngineError
from gateway.api.family import RESPONSES
from gateway.http.error_handlers import validation_error
from gateway.http.middleware import caller
from gateway.http.websocket import CLOSE_TOO_BIG, CLOSE_TRY_AGAIN_LATER, send_batches, send_error
from gateway.responses.request import ResponsesRequest
from gateway.responses.service import ResponsesService
from gateway.responses.store import StoredResponse
from protocol.logs import current_request_id

log = logging.getLogger(__name__)
router = APIRouter()


class ConnectionLimit:
    """At most ``limit`` open WebSocket connections (each holds a conversation's state)."""

    def __init__(self, limit: int = 64, max_frame_bytes: int = 4 << 20):
        self.limit = limit
        self.max_frame_bytes = max_frame_bytes
        self.open = 0


@router.websocket("/v1/responses")
async def responses_socket(socket: WebSocket) -> None:
    limit: ConnectionLimit = socket.app.state.websockets
    await socket.accept()
    if limit.open >= limit.limit:
        await socket.close(CLOSE_TRY_AGAIN_LATER, f"more than {limit.limit} WebSocket connections; try again shortly")
        return
    limit.open += 1
    try:
        await ResponsesConnection(socket, socket.app.state.responses, limit.max_frame_bytes).serve()
    finally:
        limit.open -= 1


class ResponsesConnection:
    def __init__(self, socket: WebSocket, service: ResponsesService, max_frame_bytes: int):
        self.socket = socket
        self.service = service
        self.max_frame_bytes = max_frame_bytes
        self.last: StoredResponse | None = None  # what previous_response_id may name here
        self._frames: asyncio.Queue[str] = asyncio.Queue()
        self._closed = asyncio.Event()

    async def serve(self) -> None:
        reader = asyncio.create_task(self._read(), name="websocket-reader")
        closed = asyncio.create_task(self._closed.wait())
        try:
            while not self._closed.is_set():
                next_frame = asyncio.create_task(self._frames.get())
                await asyncio.wait({next_frame, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not next_frame.done():
                    next_frame.cancel()
                    return
                response = asyncio.create_task(self._respond(next_frame.result()))
                await asyncio.wait({response, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not response.done():  # the client left mid-response: stop its generation now
                    response.cancel()
                    await asyncio.gather(response, return_exceptions=True)
                    return
                response.result()
        finally:
            for task in (reader, closed):
                task.cancel()
            await asyncio.gather(reader, closed, return_exceptions=True)

    async def _read(self) -> None:
        try:
            while True:
                message = await self.socket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None:
                    text = (message.get("bytes") or b"").decode("utf-8", errors="replace")
                if len(text) > self.max_frame_bytes:
                    await self.socket.close(CLOSE_TOO_BIG, f"frames are limited to {self.max_frame_bytes} bytes")
                    return
                self._frames.put_nowait(text)
        finally:
            self._closed.set()

    async def _respond(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except json.JSONDecodeError:
            await send_error(self.socket, APIError(400, "The frame is not valid JSON."))
            return
        kind = frame.pop("type", None) if isinstance(frame, dict) else None
        if kind == "response.processed":
            return  # the client's acknowledgement: nothing to do
        if kind != "response.create":
            await send_error(self.socket, APIError(400, f"Unknown frame type {kind!r}; send 'response.create'.",
                                                   param="type"))
            return
        try:
            await self._run(frame)
        except APIError as error:
            await send_error(self.socket, error)

    async def _run(self, frame: dict[str, Any]) -> None:
        try:
            body = ResponsesRequest.model_validate(frame)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if body.background:
            raise APIError(400, "background responses are not supported over a WebSocket; POST them",
                           param="background")
        response_id = RESPONSES.new_id()
        current_request_id.set(response_id)
        try:
            run = await self.service.prepare(body, response_id, response_id, local=self.last,
                                             owner=caller(self.socket.scope))
        except APIError as error:
            if error.code == "previous_response_not_found":
                self.last = None
            raise
        except EngineError as failure:
            raise RESPONSES.error(failure) from None
        await send_batches(self.socket, self.service.events(run))
        self.last = run.remembered()
        log.info("response %s over WebSocket: %s", response_id, run.state.status)
