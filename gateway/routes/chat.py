"""POST /v1/chat/completions"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.chunks import Chunk, ChunkFormat, finish_reason, sse_chunks, usage
from gateway.errors import APIError
from gateway.generation import ClientDisconnected, collect, submit
from gateway.json_schema import tool_schema
from gateway.middleware import bind_request_id
from gateway.schemas import ChatCompletionRequest, ChatMessage
from gateway.sse import EventStreamResponse
from gateway.structured_output import from_chat, with_instruction
from protocol import Delta, Finished, Generate, ToolCall

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    trace_id = bind_request_id(request, request_id, body.model)
    tools, tool_choice = _tools(body)
    constraint = from_chat(body.response_format)
    generate = Generate(
        request_id=request_id,
        messages=with_instruction([_worker_message(m, i) for i, m in enumerate(body.messages)], constraint),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        sampling=body.sampling(),
        stop=body.stop_list(),
        chat_template_kwargs=body.chat_template_kwargs or {},
        trace_id=trace_id,
        constraint=constraint,
    )
    stream = await submit(request, body.model, generate)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(sse_chunks(stream, ChatChunks(request_id, body.model, created, include_usage)))
    try:
        out = await collect(stream, request)
    except ClientDisconnected:
        return Response(status_code=499)
    message: dict[str, Any] = {"role": "assistant", "content": out.text}
    if out.reasoning:
        message["reasoning_content"] = out.reasoning
    if out.tool_calls:
        message["tool_calls"] = [_tool_call(call) for call in out.tool_calls]
    return JSONResponse({
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason(stream.finished, bool(out.tool_calls)),
        }],
        "usage": usage(stream.finished),
    })


class ChatChunks(ChunkFormat):
    object_name = "chat.completion.chunk"
    prompt_param = "messages"

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool):
        super().__init__(request_id, model, created, include_usage)
        self._calls = 0  # tool calls sent so far: each chunk's call has its index

    def opening(self) -> list[Chunk]:
        return [self.chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})]

    def delta(self, delta: Delta) -> list[Chunk]:
        out = []
        if delta.reasoning:
            out.append(self.chunk({"delta": {"reasoning_content": delta.reasoning}, "finish_reason": None}))
        if delta.text:
            out.append(self.chunk({"delta": {"content": delta.text}, "finish_reason": None}))
        for call in delta.tool_calls:
            out.append(self.chunk({"delta": {"tool_calls": [{"index": self._calls, **_tool_call(call)}]},
                                   "finish_reason": None}))
            self._calls += 1
        return out

    def closing(self, finished: Finished | None) -> Chunk:
        return self.chunk({"delta": {}, "finish_reason": finish_reason(finished, self._calls > 0)})


def _tools(body: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, str]:
    """The tools the template gets, and "auto" or "required", from ``tool_choice``."""
    choice = body.tool_choice
    for index, tool in enumerate(body.tools or []):
        if tool.get("type", "function") != "function":
            continue  # other kinds go to the template as they are
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(400, "a function tool needs a function with a name", param=f"tools.{index}.function")
        tool_schema(function.get("parameters"), f"tools.{index}.function.parameters")
    if not body.tools or choice == "none":
        return None, "auto"
    if choice == "required":
        return body.tools, "required"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in body.tools if (t.get("function") or {}).get("name") == name]
        if not chosen:
            raise APIError(400, f"tool_choice names an unknown function {name!r}", param="tool_choice")
        return chosen, "required"
    return body.tools, "auto"


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


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
