"""POST /v1/completions (raw text in, text out; no chat template)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.chunks import Chunk, ChunkFormat, finish_reason, sse_chunks, usage
from gateway.errors import APIError
from gateway.generation import ClientDisconnected, collect, submit
from gateway.middleware import bind_request_id
from gateway.schemas import CompletionRequest
from gateway.sse import EventStreamResponse
from protocol import Delta, Finished, Generate

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
    stream = await submit(request, body.model, generate)
    created = int(time.time())
    prefix = prompt if body.echo else ""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(sse_chunks(stream, CompletionChunks(request_id, body.model, created,
                                                                       include_usage, prefix)))
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


class CompletionChunks(ChunkFormat):
    object_name = "text_completion"
    prompt_param = "prompt"

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool, echo: str):
        super().__init__(request_id, model, created, include_usage)
        self.echo = echo  # the prompt, sent first when the client asked for it back

    def opening(self) -> list[Chunk]:
        return [self.chunk({"text": self.echo, "finish_reason": None})] if self.echo else []

    def delta(self, delta: Delta) -> list[Chunk]:
        return [self.chunk({"text": delta.text, "finish_reason": None})] if delta.text else []

    def closing(self, finished: Finished | None) -> Chunk:
        return self.chunk({"text": "", "finish_reason": finish_reason(finished)})


def _single_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]
    raise APIError(400, "send one prompt per request (concurrent requests are batched)", param="prompt")
