"""Each API family, described once: where it is served, its own names for the prompt and the
output-format fields (named in ``param`` when a failure concerns them), the shape of its error
body, and its ids. The error handlers, the stream loop and the routes read this, instead of
restating field names in each module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway.api.errors import APIError, EngineError, anthropic_body, anthropic_status, api_error, openai_body
from gateway.api.ids import new_id
from protocol.messages import ERROR_CONTEXT_LENGTH


@dataclass(frozen=True)
class ApiFamily:
    name: str
    path_prefix: str  # every path under it answers errors in this family's shape
    prompt_param: str | None  # "input", "messages", "prompt"
    format_param: str | None  # its structured-output field
    error_shape: Literal["openai", "anthropic"]
    id_prefix: str
    id_separator: str = "_"
    id_length: int = 32
    # The vendor's own words for a prompt over the window, which its clients parse (None: ours).
    overflow_wording: str | None = None

    def new_id(self) -> str:
        return new_id(self.id_prefix, self.id_length, self.id_separator)

    def error(self, failure: EngineError) -> APIError:
        """An engine failure as this family's error, its fields named the family's way."""
        error = api_error(failure, self.prompt_param, self.format_param)
        if (failure.code == ERROR_CONTEXT_LENGTH and self.overflow_wording is not None
                and failure.prompt_tokens is not None and failure.context_length is not None):
            error.message = self.overflow_wording.format(prompt_tokens=failure.prompt_tokens,
                                                         context_length=failure.context_length)
            error.param = None  # the message stands as the vendor writes it
        return error

    def error_status_and_body(self, error: APIError) -> tuple[int, dict[str, Any]]:
        if self.error_shape == "anthropic":
            return anthropic_status(error), anthropic_body(error)
        return error.status, openai_body(error)


RESPONSES = ApiFamily("responses", "/v1/responses", "input", "text.format", "openai", "resp")
CHAT = ApiFamily("chat", "/v1/chat/completions", "messages", "response_format", "openai", "chatcmpl", "-")
COMPLETIONS = ApiFamily("completions", "/v1/completions", "prompt", None, "openai", "cmpl", "-")
MESSAGES = ApiFamily("messages", "/v1/messages", "messages", "output_config.format", "anthropic", "msg",
                     id_length=24, overflow_wording="prompt is too long: {prompt_tokens} tokens > {context_length} maximum")
# Routes of no family (models, workers, health): OpenAI's error shape, no fields to name.
OTHER = ApiFamily("other", "/", None, None, "openai", "req")

FAMILIES = (RESPONSES, CHAT, COMPLETIONS, MESSAGES)


def family_for_path(path: str) -> ApiFamily:
    for family in FAMILIES:
        prefix = family.path_prefix
        if path == prefix or path.startswith(prefix + "/"):
            return family
    return OTHER
