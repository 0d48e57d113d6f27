"""Worker output -> Chat Completions and Completions chunks, and the whole reply.

``ChatChunks`` and ``CompletionChunks`` are the families' event builders (``api/generation.py``):
the opening chunks, chunks per delta, the chunk with the finish reason, the usage chunk if
asked for, an error chunk if the request fails (the SSE sender then ends with ``[DONE]``).
They also keep the whole reply, so ``result()`` is the JSON answer built from the same state.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.api.errors import APIError, openai_body
from protocol import Delta, Finished, ToolCall

Chunk = dict[str, Any]


class ChunkFormat:
    """One API's chunks; subclasses say what a delta, the opening and the reply look like."""

    object_name = ""

    def __init__(self, request_id: str, model: str, include_usage: bool = False):
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.finished: Finished | None = None
        self.failure: APIError | None = None

    def start(self) -> list[Chunk]:
        return []

    def add(self, delta: Delta) -> list[Chunk]:
        raise NotImplementedError

    def finish(self, finished: Finished) -> list[Chunk]:
        self.finished = finished
        out = [self.closing()]
        if self.include_usage:
            out.append({**self.chunk({}), "choices": [], "usage": usage(finished)})
        return out

    def fail(self, error: APIError) -> list[Chunk]:
        self.failure = error
        return [openai_body(error)]

    def closing(self) -> Chunk:
        raise NotImplementedError

    def chunk(self, choice: dict[str, Any]) -> Chunk:
        payload: Chunk = {
            "id": self.request_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, **choice, "logprobs": None}],
        }
        if self.include_usage:
            payload["usage"] = None
        return payload

    def reply(self, object_name: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, **choice}],
            "usage": usage(self.finished),
        }


class ChatChunks(ChunkFormat):
    object_name = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, include_usage: bool = False):
        super().__init__(request_id, model, include_usage)
        self.text = ""
        self.reasoning = ""
        self.tool_calls: list[ToolCall] = []  # each chunk's call has its index here

    def start(self) -> list[Chunk]:
        return [self.chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})]

    def add(self, delta: Delta) -> list[Chunk]:
        out = []
        if delta.reasoning:
            self.reasoning += delta.reasoning
            out.append(self.chunk({"delta": {"reasoning_content": delta.reasoning}, "finish_reason": None}))
        if delta.text:
            self.text += delta.text
            out.append(self.chunk({"delta": {"content": delta.text}, "finish_reason": None}))
        for call in delta.tool_calls:
            out.append(self.chunk({"delta": {"tool_calls": [{"index": len(self.tool_calls), **_tool_call(call)}]},
                                   "finish_reason": None}))
            self.tool_calls.append(call)
        return out

    def closing(self) -> Chunk:
        return self.chunk({"delta": {}, "finish_reason": finish_reason(self.finished, bool(self.tool_calls))})

    def result(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [_tool_call(call) for call in self.tool_calls]
        return self.reply("chat.completion", {"message": message, "logprobs": None,
                                              "finish_reason": finish_reason(self.finished, bool(self.tool_calls))})


class CompletionChunks(ChunkFormat):
    object_name = "text_completion"

    def __init__(self, request_id: str, model: str, include_usage: bool = False, echo: str = ""):
        super().__init__(request_id, model, include_usage)
        self.echo = echo  # the prompt, sent first when the client asked for it back
        self.text = ""

    def start(self) -> list[Chunk]:
        return [self.chunk({"text": self.echo, "finish_reason": None})] if self.echo else []

    def add(self, delta: Delta) -> list[Chunk]:
        self.text += delta.text
        return [self.chunk({"text": delta.text, "finish_reason": None})] if delta.text else []

    def closing(self) -> Chunk:
        return self.chunk({"text": "", "finish_reason": finish_reason(self.finished)})

    def result(self) -> dict[str, Any]:
        return self.reply("text_completion", {"text": self.echo + self.text, "logprobs": None,
                                              "finish_reason": finish_reason(self.finished)})


def finish_reason(finished: Finished | None, made_tool_calls: bool = False) -> str:
    if finished is not None and finished.finish_reason == "length":
        return "length"
    return "tool_calls" if made_tool_calls else "stop"


def usage(finished: Finished | None) -> dict[str, Any]:
    """The ``usage`` object of Chat Completions and Completions."""
    prompt = finished.prompt_tokens if finished else 0
    completion = finished.completion_tokens if finished else 0
    details: dict[str, Any] = {"cached_tokens": finished.cached_tokens if finished else 0}
    if finished and finished.cached_tokens_disk:  # of those, restored from the worker's disk cache
        details["cached_tokens_disk"] = finished.cached_tokens_disk
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
    }


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
