"""The bodies of ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

Lenient on purpose: Claude Code sends fields a local model has no use for (``metadata``,
``context_management``, ``output_config``, ``thinking.display``, ``defer_loading`` on tools,
new beta fields every few releases) and must never get a 400 for them. Content blocks, tools
and ``tool_choice`` stay plain dicts here; ``convert.py`` reads them leniently. Integer fields
take ``463.0`` as 463, as the documented JSON Schema ``integer`` does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.api.request import TOKEN_LIMIT
from gateway.http.json_body import Integer, OptionalInteger


class MessagesBody(BaseModel):
    """What both bodies hold; ``convert.to_request`` reads this."""

    model_config = ConfigDict(extra="allow", strict=True)  # "4" is no number, "yes" no boolean

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | str | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: OptionalInteger = Field(default=None, ge=0, le=TOKEN_LIMIT)
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    stream: bool | None = False
    output_config: dict[str, Any] | None = None  # its "format" is structured output (structured_output.py)
    output_format: dict[str, Any] | None = None  # the structured-outputs beta's name for it
    context_management: dict[str, Any] | None = None
    service_tier: str | None = None
    container: Any = None
    mcp_servers: list[Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # ours: passed to the template as is


class MessagesRequest(MessagesBody):
    max_tokens: Integer = Field(ge=1, le=TOKEN_LIMIT)


class CountTokensRequest(MessagesBody):
    """The same body, where ``max_tokens`` may be left out (nothing is generated)."""

    max_tokens: OptionalInteger = Field(default=None, ge=1, le=TOKEN_LIMIT)
