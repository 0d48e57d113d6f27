"""The Responses API over a WebSocket: ``GET /v1/responses`` upgraded (Codex's preferred transport).

Each client frame ``{"type": "response.create", ...the POST body...}`` runs one response; its
events go out one text frame each, the same objects in the same order as over SSE. One
response at a time per connection: frames that arrive meanwhile wait their turn, at most
``ConnectionLimit.max_queued_frames`` of them, holding ``max_queued_bytes`` together (a first
waiting frame may be as large as any frame); a frame past either bound gets an error frame
(429, ``websocket_queue_full``) and is dropped. The
connection keeps its last response, so ``previous_response_id`` continues from it even with
``store: false``; a failed response (or an unknown id) drops that.

Every frame gets an answer: the response's events, or an ``error`` frame (a frame that is not
JSON, nests too deep or holds a lone surrogate is checked as a request body is, by
``http/json_body.py``), and the connection stays open. Only the key check (middleware), the
connection limit, the frame size (1009) and a client that stops reading close it: a send that
waits ``send_timeout`` seconds (the client's buffers are full) stops its generation and closes
the connection with 1008. A client that closes the socket stops its generation at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from gateway.api.errors import APIError, EngineError
from gateway.api.family import RESPONSES
from gateway.api.generation import with_heartbeats
from gateway.http.error_handlers import validation_error
from gateway.http.json_body import load_json, shown
from gateway.http.middleware import caller
from gateway.http.sse import KEEPALIVE_S
from gateway.http.websocket import (
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    SEND_TIMEOUT_S,
    FrameSender,
    bound_send_buffer,
    drop_stalled,
    send_batches,
)
from gateway.responses.request import ResponsesRequest
from gateway.responses.service import ResponsesService
from gateway.responses.store import StoredResponse
from protocol.logs import current_request_id

log = logging.getLogger(__name__)
router = APIRouter()

_INTERNAL = APIError(500, "The server had an error while processing this frame.", "server_error", code="server_error")


class ConnectionLimit:
    """What one WebSocket connection may hold: at most ``limit`` connections at once (each holds a
    conversation's state), frames of ``max_frame_bytes``, and waiting behind a running response
    at most ``max_queued_frames`` frames of ``max_queued_bytes`` together (default: one frame's
    worth); a send may wait ``send_timeout`` seconds for a client that does not read."""

    def __init__(self, limit: int = 64, max_frame_bytes: int = 4 << 20, max_queued_frames: int = 8,
                 max_queued_bytes: int | None = None, send_timeout: float = SEND_TIMEOUT_S):
        self.limit = limit
        self.max_frame_bytes = max_frame_bytes
        self.max_queued_frames = max_queued_frames
        self.max_queued_bytes = max_frame_bytes if max_queued_bytes is None else max_queued_bytes
        self.send_timeout = send_timeout
        self.open = 0


@router.websocket("/v1/responses")
async def responses_socket(socket: WebSocket) -> None:
    limit: ConnectionLimit = socket.app.state.websockets
    await socket.accept()
    if limit.open >= limit.limit:
        await socket.close(CLOSE_TRY_AGAIN_LATER, f"more than {limit.limit} WebSocket connections; try again shortly")
        return
    limit.open += 1
    bound_send_buffer(socket)
    try:
        await ResponsesConnection(socket, socket.app.state.responses, limit).serve()
    finally:
        limit.open -= 1


class ResponsesConnection:
    def __init__(self, socket: WebSocket, service: ResponsesService, limits: ConnectionLimit):
        self.socket = socket
        self.service = service
        self.limits = limits
        self.sender = FrameSender(socket, limits.send_timeout)
        self.last: StoredResponse | None = None  # what previous_response_id may name here
        self._frames: asyncio.Queue[str | bytes] = asyncio.Queue()
        self._queued_bytes = 0
        self._closed = asyncio.Event()

    async def serve(self) -> None:
        reader = asyncio.create_task(self._read(), name="websocket-reader")
        watchdog = asyncio.create_task(self.sender.watch(), name="websocket-watchdog")
        closed = asyncio.create_task(self._closed.wait())
        stalled = asyncio.create_task(self.sender.stalled.wait())
        ended = {closed, stalled}
        try:
            while not (closed.done() or stalled.done()):
                next_frame = asyncio.create_task(self._frames.get())
                await asyncio.wait({next_frame, *ended}, return_when=asyncio.FIRST_COMPLETED)
                if not next_frame.done():
                    next_frame.cancel()
                    break
                frame = next_frame.result()
                self._queued_bytes -= len(frame)
                response = asyncio.create_task(self._respond(frame))
                await asyncio.wait({response, *ended}, return_when=asyncio.FIRST_COMPLETED)
                if not response.done():  # the client left or stopped reading: stop its generation now
                    response.cancel()
                    await asyncio.gather(response, return_exceptions=True)
                    break
                failed = response.exception()
                if failed is not None:  # _respond answers every frame: only a socket that broke gets here
                    if not isinstance(failed, WebSocketDisconnect):
                        log.info("WebSocket connection ends: %r", failed)
                    break
            stalled_open = self.sender.stalled.is_set() and not self._closed.is_set()
        finally:
            tasks = (reader, watchdog, closed, stalled)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if stalled_open:
            waited = self.limits.send_timeout
            log.warning("a WebSocket client read nothing for %g s: its response is stopped and the connection "
                        "closed (1008)", waited)
            await drop_stalled(self.socket, f"the client did not read its stream for {waited:g} s")

    async def _read(self) -> None:
        try:
            while True:
                message = await self.socket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                frame: str | bytes | None = message.get("text")
                if frame is None:
                    frame = message.get("bytes") or b""
                if len(frame) > self.limits.max_frame_bytes:
                    await self.socket.close(CLOSE_TOO_BIG, f"frames are limited to {self.limits.max_frame_bytes} bytes")
                    return
                waiting = self._frames.qsize()
                if waiting >= self.limits.max_queued_frames or (
                        waiting and self._queued_bytes + len(frame) > self.limits.max_queued_bytes):
                    await self.sender.send_error(APIError(
                        429, f"Too many frames wait behind the running response (at most "
                        f"{self.limits.max_queued_frames} frames of {self.limits.max_queued_bytes} bytes together); "
                        "this one is dropped. Send the next response.create when the last one has ended.",
                        "rate_limit_error", code="websocket_queue_full"))
                    continue
                self._queued_bytes += len(frame)
                self._frames.put_nowait(frame)
        except WebSocketDisconnect:
            return
        finally:
            self._closed.set()

    async def _respond(self, frame: str | bytes) -> None:
        """One frame's answer: its response's events, or an error frame. Raises only when the
        socket itself cannot be written (``WebSocketDisconnect``, or a send after a close)."""
        try:
            await self._answer(frame)
        except APIError as error:
            await self.sender.send_error(error)
        except WebSocketDisconnect:
            raise
        except Exception:  # a bug of ours: the frame still gets an answer, and the connection stays
            log.exception("WebSocket frame failed")
            await self.sender.send_error(_INTERNAL)

    async def _answer(self, text: str | bytes) -> None:
        frame = load_json(text, "frame")
        kind = frame.pop("type", None) if isinstance(frame, dict) else None
        if kind == "response.processed":
            return  # the client's acknowledgement: nothing to do
        if kind != "response.create":
            named = f"Unknown frame type {shown(kind)!r}" if isinstance(kind, str) else "The frame has no string 'type'"
            raise APIError(400, f"{named}; send 'response.create'.", param="type")
        await self._run(frame)

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
        except (APIError, EngineError) as failure:
            # A continuation that fails (an unknown id, a tool output for no call, ...) evicts the
            # response it continued from: continuing from it again is previous_response_not_found.
            if body.previous_response_id is not None:
                self.last = None
            if isinstance(failure, EngineError):
                raise RESPONSES.error(failure) from None
            raise
        every = float(getattr(self.socket.app.state, "keepalive_s", KEEPALIVE_S))
        await send_batches(self.sender, with_heartbeats(self.service.events(run), run.builder.heartbeat, every))
        self.last = run.remembered()
        log.info("response %s over WebSocket: %s", response_id, run.state.status)
