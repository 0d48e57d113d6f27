"""The chunk stream that Chat Completions and Completions share.

Each API says what its chunks hold (``ChunkFormat``); ``sse_chunks`` runs the one loop:
the opening chunks, a write per batch of deltas that arrived together, the chunk with the
finish reason, the usage chunk if asked for, an error chunk if the request failed, then
``[DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from gateway.engine_client import RequestStream
from gateway.errors import EngineError, api_error, openai_body
from gateway.sse import SSE_DONE, sse_data
from protocol import Delta, Finished

Chunk = dict[str, Any]


class ChunkFormat:
    """One API's chunks; subclasses say what a delta and the opening look like."""

    object_name = ""
    prompt_param = ""  # the API's prompt field, named in a failed request's error
    format_param = "response_format"  # its structured-output field, likewise

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool):
        self.request_id = request_id
        self.model = model
        self.created = created
        self.include_usage = include_usage

    def opening(self) -> list[Chunk]:
        return []

    def delta(self, delta: Delta) -> list[Chunk]:
        raise NotImplementedError

    def closing(self, finished: Finished | None) -> Chunk:
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


async def sse_chunks(stream: RequestStream, chunks: ChunkFormat) -> AsyncGenerator[bytes, None]:
    try:
        opening = chunks.opening()
        if opening:
            yield b"".join(sse_data(chunk) for chunk in opening)
        async for batch in stream.batches():  # what arrived together goes out in one write
            out = [sse_data(chunk) for delta in batch for chunk in chunks.delta(delta)]
            if out:
                yield b"".join(out)
        yield sse_data(chunks.closing(stream.finished))
        if chunks.include_usage:
            yield sse_data({**chunks.chunk({}), "choices": [], "usage": usage(stream.finished)})
    except EngineError as exc:
        yield sse_data(openai_body(api_error(exc, chunks.prompt_param, chunks.format_param)))
    finally:
        stream.close()  # stops the generation if the client went away mid-stream
    yield SSE_DONE


def finish_reason(finished: Finished | None, made_tool_calls: bool = False) -> str:
    if finished is not None and finished.finish_reason == "length":
        return "length"
    return "tool_calls" if made_tool_calls else "stop"


def usage(finished: Finished | None) -> dict[str, Any]:
    """The ``usage`` object of Chat Completions and Completions."""
    prompt = finished.prompt_tokens if finished else 0
    completion = finished.completion_tokens if finished else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": finished.cached_tokens if finished else 0},
    }
