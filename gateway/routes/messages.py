"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens.

The same shape as every generation route: make the id, bind it to the request's logs,
submit (a failure before generation is an Anthropic-shaped HTTP error), then stream the
``MessageEvents`` as SSE (with ``ping`` events through long silences) or collect them into
one Message. Query strings such as Claude Code's ``?beta=true`` and ``anthropic-*`` headers
are accepted and need nothing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.anthropic.conversation import Prompt, to_chat
from gateway.anthropic.events import MessageEvents, new_id
from gateway.anthropic.request import CountTokensRequest, MessagesRequest
from gateway.engine_client import RequestStream
from gateway.errors import EngineError, anthropic_type, api_error
from gateway.generation import ClientDisconnected, submit, unless_disconnected
from gateway.middleware import bind_request_id
from gateway.sse import EventStreamResponse, sse_event
from protocol import Generate, SamplingParams

router = APIRouter()

PING = sse_event({"type": "ping"})


@router.post("/v1/messages")
async def create_message(body: MessagesRequest, request: Request) -> Response:
    message_id = new_id("msg")
    trace_id = bind_request_id(request, message_id, body.model)
    prompt = to_chat(body)
    sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k)
    generate = _generate(message_id, body, prompt, request, trace_id, max_tokens=body.max_tokens, sampling=sampling,
                         stop=list(body.stop_sequences or []), constraint=prompt.constraint)
    stream = await submit(request, body.model, generate)
    builder = MessageEvents(message_id, body.model, prompt.tool_names, prompt.parallel, prompt.omit_thinking)
    if body.stream:
        return EventStreamResponse(_sse(stream, builder), keepalive=PING)

    async def build() -> None:
        try:
            async for batch in stream.batches():
                for delta in batch:
                    builder.add(delta)
        finally:
            stream.close()
        assert stream.finished is not None  # batches() ends only at Finished
        builder.finish(stream.finished, stream.finished.stop_sequence)

    try:
        await unless_disconnected(request, build())
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(builder.message())


async def _sse(stream: RequestStream, builder: MessageEvents) -> AsyncGenerator[bytes, None]:
    try:
        yield b"".join(sse_event(event) for event in builder.start(stream.prompt_tokens))
        async for batch in stream.batches():  # what arrived together goes out in one write
            events = [event for delta in batch for event in builder.add(delta)]
            if events:
                yield b"".join(sse_event(event) for event in events)
        assert stream.finished is not None
        yield b"".join(sse_event(event) for event in builder.finish(stream.finished, stream.finished.stop_sequence))
    except EngineError as exc:
        error = api_error(exc, "messages", "output_config.format")
        yield sse_event(builder.error(anthropic_type(error), error.message))
    finally:
        stream.close()  # stops the generation if the client went away mid-stream


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, Any]:
    """The exact prompt length: the worker builds the prompt as for a generation, and counts."""
    count_id = new_id("count")
    trace_id = bind_request_id(request, count_id, body.model)
    generate = _generate(count_id, body, to_chat(body), request, trace_id, count_only=True)
    stream = await submit(request, body.model, generate)
    try:
        async for _ in stream.batches():
            pass
    finally:
        stream.close()
    return {"input_tokens": stream.prompt_tokens}


def _generate(request_id: str, body: MessagesRequest | CountTokensRequest, prompt: Prompt, request: Request,
              trace_id: str, **fields: Any) -> Generate:
    # Claude Code names its session: requests of one session go back to the replica that holds
    # its prefix cache.
    session = request.headers.get("x-claude-code-session-id") or (body.metadata or {}).get("user_id")
    return Generate(
        request_id=request_id,
        messages=prompt.messages,
        tools=prompt.tools,
        tool_choice=prompt.tool_choice,
        parallel_tool_calls=prompt.parallel,
        chat_template_kwargs=prompt.chat_template_kwargs,
        prompt_cache_key=session if isinstance(session, str) else None,
        trace_id=trace_id,
        **fields,
    )
