"""POST /v1/chat/completions"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.engine_client import RequestFailed, RequestStream
from gateway.errors import APIError, from_worker_error
from gateway.schemas import ChatCompletionRequest, ChatMessage
from gateway.streaming import (
    SSE_DONE,
    ClientDisconnected,
    EventStreamResponse,
    collect,
    finish_reason,
    sse_data,
    start,
    usage,
)
from protocol import Generate

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    generate = Generate(
        request_id=request_id,
        messages=[_worker_message(m, i) for i, m in enumerate(body.messages)],
        tools=body.tools,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        sampling=body.sampling(),
        stop=body.stop_list(),
        chat_template_kwargs=body.chat_template_kwargs or {},
    )
    stream = await start(request.app.state.engine, body.model, generate)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(_chunks(stream, body.model, created, include_usage), on_close=stream.close)
    try:
        text = await collect(stream, request)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse({
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason(stream.finished),
        }],
        "usage": usage(stream.finished),
    })


async def _chunks(stream: RequestStream, model: str, created: int, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        payload = {
            "id": stream.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return payload

    yield sse_data(chunk({"role": "assistant", "content": ""}))
    try:
        async for delta in stream:
            if delta.text:
                yield sse_data(chunk({"content": delta.text}))
        yield sse_data(chunk({}, finish_reason(stream.finished)))
        if include_usage:
            yield sse_data({**chunk({}), "choices": [], "usage": usage(stream.finished)})
    except RequestFailed as exc:
        yield sse_data(from_worker_error(exc.error).body())
    yield SSE_DONE


def _worker_message(message: ChatMessage, index: int) -> dict[str, Any]:
    """The plain {role, content, ...} dict chat templates expect."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type not in ("text", "input_text") or part.text is None:
                raise APIError(400, f"content part type '{part.type}' is not supported; send text",
                               param=f"messages.{index}.content.{j}")
            texts.append(part.text)
        content = "".join(texts)
    # Many chat templates know no "developer" role; it means "system" for open models.
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                           "content": content or ""}
    for key in ("name", "tool_calls", "tool_call_id"):
        value = getattr(message, key)
        if value is not None:
            out[key] = value
    return out
