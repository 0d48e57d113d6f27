"""Request bodies of the Chat Completions and Completions APIs.

Unknown fields are accepted and ignored, as OpenAI clients send many optional ones.
Everything that reaches the worker is validated here, so a bad request is a 400 before
any work starts. Integer fields take ``463.0`` as 463, as the documented JSON Schema
``integer`` does; ``"4"``, ``true`` and ``4.5`` are refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.api.request import TOKEN_LIMIT
from gateway.http.json_body import Integer, OptionalInteger
from protocol import SamplingParams


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # "4" is no number, "yes" no boolean


class TextPart(Lenient):
    type: str
    text: str | None = None


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(Lenient):
    include_usage: bool = False


class SamplingFields(Lenient):
    """What Chat Completions and Completions share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: OptionalInteger = Field(default=None, ge=1, le=TOKEN_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: OptionalInteger = Field(default=None, ge=0, le=TOKEN_LIMIT)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None
    n: Integer = Field(default=1, ge=1, le=1)  # one choice per request: batch with concurrent requests instead

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.min_p,
                              self.presence_penalty, self.frequency_penalty)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: OptionalInteger = Field(default=None, ge=1, le=TOKEN_LIMIT)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None  # text | json_object | json_schema (api/structured_output.py)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
