"""POST /v1/chat/completions and POST /v1/completions (raw text in, text out; no template)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.api import images
from gateway.api.family import CHAT, COMPLETIONS
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
from gateway.api.request import ModelRequest
from gateway.chat.chunks import ChatChunks, CompletionChunks
from gateway.chat.convert import chat_request, completion_request
from gateway.chat.request import ChatCompletionRequest, CompletionRequest, SamplingFields
from gateway.http.sse import event_stream, keepalive_interval

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    request_id = CHAT.new_id()
    trace_id = bind_request_id(request, request_id, body.model)
    chunks = ChatChunks(request_id, body.model, _include_usage(body))
    return await _reply(request, body, await images.convert(chat_request, body), chunks, trace_id)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    request_id = COMPLETIONS.new_id()
    trace_id = bind_request_id(request, request_id, body.model)
    model_request = completion_request(body)
    echo = (model_request.prompt or "") if body.echo else ""
    chunks = CompletionChunks(request_id, body.model, _include_usage(body), echo)
    return await _reply(request, body, model_request, chunks, trace_id)


async def _reply(request: Request, body: SamplingFields, model_request: ModelRequest,
                 chunks: ChatChunks | CompletionChunks, trace_id: str) -> Response:
    async def open_reply() -> AsyncGenerator[list[Event], None]:
        stream = await submit(request, model_request, chunks.request_id, trace_id)
        return event_batches(chunks, model_request.family, stream)

    if body.stream and needs_load(request, model_request.model):
        # Its model loads first (minutes, for a large one): keep-alive comments through the load.
        return event_stream(opened_late(open_reply, chunks.fail, model_request.family), typed=False, done=True,
                            every=keepalive_interval(request))
    batches = await open_reply()
    if body.stream:
        return event_stream(batches, typed=False, done=True, every=keepalive_interval(request))
    try:
        await drain(batches, chunks, request)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(chunks.result())


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)
