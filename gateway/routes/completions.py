"""POST /v1/completions (raw text in, text out; no chat template)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.engine_client import RequestFailed, RequestStream
from gateway.errors import APIError, from_worker_error
from gateway.middleware import bind_request_id
from gateway.schemas import CompletionRequest
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

# The legacy API's default, which clients relying on it expect.
DEFAULT_MAX_TOKENS = 16


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    prompt = _single_prompt(body.prompt)
    if body.suffix is not None:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    trace_id = bind_request_id(request, request_id, body.model)
    generate = Generate(
        request_id=request_id,
        prompt=prompt,
        max_tokens=body.max_tokens or DEFAULT_MAX_TOKENS,
        sampling=body.sampling(),
        stop=body.stop_list(),
        trace_id=trace_id,
    )
    stream = await start(request.app.state.engine, body.model, generate)
    created = int(time.time())
    prefix = prompt if body.echo else ""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(stream, body.model, created, prefix, include_usage)
        return EventStreamResponse(chunks)
    try:
        text = (await collect(stream, request)).text
    except ClientDisconnected:
        return Response(status_code=499)
    choice = {"index": 0, "text": prefix + text, "logprobs": None, "finish_reason": finish_reason(stream.finished)}
    return JSONResponse({
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": usage(stream.finished),
    })


def _single_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]
    raise APIError(400, "send one prompt per request (concurrent requests are batched)", param="prompt")


async def _chunks(
    stream: RequestStream, model: str, created: int, prefix: str, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        payload = {
            "id": stream.request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return payload

    try:
        if prefix:
            yield sse_data(chunk(prefix))
        async for batch in stream.batches():  # what arrived together goes out in one write
            out = [sse_data(chunk(delta.text)) for delta in batch if delta.text]
            if out:
                yield b"".join(out)
        yield sse_data(chunk("", finish_reason(stream.finished)))
        if include_usage:
            yield sse_data({**chunk(""), "choices": [], "usage": usage(stream.finished)})
    except RequestFailed as exc:
        yield sse_data(from_worker_error(exc.error).body())
    finally:
        stream.close()  # stops the generation if the client went away mid-stream
    yield SSE_DONE
