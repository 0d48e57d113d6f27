"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens.

The same shape as every generation route: make the id, bind it to the request's logs,
convert the body, submit (a failure before generation is an Anthropic-shaped HTTP error),
then send the ``MessageEvents`` as SSE (with ``ping`` events through long silences) or drain
them into one Message. Query strings such as Claude Code's ``?beta=true`` and ``anthropic-*``
headers are accepted and need nothing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.anthropic.convert import omits_thinking, to_request
from gateway.anthropic.events import MessageEvents
from gateway.anthropic.request import CountTokensRequest, MessagesRequest
from gateway.api import images
from gateway.api.family import MESSAGES
from gateway.api.generation import (
    ClientDisconnected,
    Event,
    bind_request_id,
    drain,
    event_batches,
    needs_load,
    opened_late,
    submit,
)
from gateway.api.ids import new_id
from gateway.http.sse import event_stream, keepalive_interval, sse_event

router = APIRouter()

PING = sse_event({"type": "ping"})


@router.post("/v1/messages")
async def create_message(body: MessagesRequest, request: Request) -> Response:
    message_id = MESSAGES.new_id()
    trace_id = bind_request_id(request, message_id, body.model)
    model_request = await images.convert(to_request, body, _session(request))

    async def open_reply() -> tuple[MessageEvents, AsyncGenerator[list[Event], None]]:
        stream = await submit(request, model_request, message_id, trace_id)
        builder = MessageEvents(message_id, body.model, stream.prompt_tokens, model_request.parallel_tool_calls,
                                omits_thinking(body))
        return builder, event_batches(builder, MESSAGES, stream)

    if body.stream and needs_load(request, body.model):
        # Its model loads first (minutes, for a large one): ping through the load.
        async def batches_once_loaded() -> AsyncGenerator[list[Event], None]:
            return (await open_reply())[1]

        failed = MessageEvents(message_id, body.model, 0, model_request.parallel_tool_calls)
        return event_stream(opened_late(batches_once_loaded, failed.fail, MESSAGES), keepalive=PING,
                            every=keepalive_interval(request))
    builder, batches = await open_reply()
    if body.stream:
        return event_stream(batches, keepalive=PING, every=keepalive_interval(request))
    try:
        await drain(batches, builder, request)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(builder.message())


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, Any]:
    """The exact prompt length: the worker builds the prompt as for a generation, and counts."""
    count_id = new_id("count", 24)
    trace_id = bind_request_id(request, count_id, body.model)
    stream = await submit(request, await images.convert(to_request, body, _session(request)), count_id, trace_id)
    try:
        async for _ in stream.batches():
            pass
    finally:
        stream.close()
    return {"input_tokens": stream.prompt_tokens}


def _session(request: Request) -> str | None:
    # Claude Code names its session: requests of one session go back to the replica that holds
    # its prefix cache.
    return request.headers.get("x-claude-code-session-id") or None
