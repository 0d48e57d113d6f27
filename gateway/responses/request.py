"""The body of ``POST /v1/responses``.

Lenient on purpose: real clients send fields we do not use (Codex's ``client_metadata``, the
agents SDK's ``prompt_cache_retention``, ...) and must never get a 400 for them. Input items
and tools stay plain dicts here; ``conversation.py`` and ``tools.py`` read them leniently.
Integer fields take ``463.0`` as 463, as the documented JSON Schema ``integer`` does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.api.request import TOKEN_LIMIT
from gateway.http.json_body import OptionalInteger


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # "4" is no number, "yes" no boolean

    model: str
    input: str | list[dict[str, Any]] = Field(default_factory=list)
    instructions: str | None = None
    stream: bool | None = False
    background: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = "auto"
    parallel_tool_calls: bool | None = True
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    max_output_tokens: OptionalInteger = Field(default=None, ge=1, le=TOKEN_LIMIT)
    max_tool_calls: OptionalInteger = Field(default=None, ge=0, le=TOKEN_LIMIT)
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    truncation: str | None = None
    top_logprobs: OptionalInteger = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    generate: bool | None = None  # false: only create the response (Codex's WebSocket prewarm)
    conversation: str | dict[str, Any] | None = None  # refused: see ResponsesService.prepare
    prompt: dict[str, Any] | None = None  # refused likewise
