"""Every way a request can fail, and the one place that turns a failure into an API's error.

Two kinds of exception reach a route:

- ``EngineError``: the request could not run or stopped. Its ``code`` is a worker's (the
  ``ERROR_*`` codes in ``protocol.messages``) or one the gateway makes (below). The engine
  client raises nothing else, whether the failure comes before the request was accepted
  (``submit``) or while it streams (``RequestStream.batches``).
- ``APIError``: a bad request the gateway found itself, already with status and ``param``.

``api_error`` maps an ``EngineError`` to an ``APIError`` (status, error type, public code, and
the API's own name for its prompt in ``param``). ``openai_body`` and ``anthropic_body`` render
an ``APIError`` in each API's shape; the exception handlers (``error_handlers.py``) and the
in-stream error events of each API family use them, so every family fails the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import messages as proto

# Failure codes the gateway itself gives (a worker's are in protocol.messages).
MODEL_NOT_FOUND = "model_not_found"  # no worker has ever served this model here
NO_WORKER = "no_worker"  # a known model has no live worker, and none came in time
QUEUE_FULL = "rate_limit_exceeded"  # OpenAI's code, which clients retry on
WORKER_CRASHED = "worker_crashed"  # its worker died or hung after output had reached the client
GATEWAY_SHUTTING_DOWN = "gateway_shutting_down"
REQUEST_CANCELLED = "request_cancelled"  # an operator stopped it (the status page)
MODEL_TOO_LARGE = "model_too_large"  # a listed model cannot fit the memory budget even alone
MODEL_LOAD_FAILED = "model_load_failed"  # its worker failed, timed out or found no room; the next request tries again


class EngineError(Exception):
    """A request failed in the engine, or could not be given to one; ``code`` says why."""

    def __init__(self, code: str, message: str, prompt_tokens: int | None = None, context_length: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.prompt_tokens = prompt_tokens  # with context_length_exceeded: the numbers, when known
        self.context_length = context_length


class APIError(Exception):
    """An error reply: HTTP status, message, OpenAI error ``type``, ``param`` and ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


@dataclass(frozen=True)
class _Mapping:
    status: int
    type: str  # OpenAI's error type
    code: str | None = None  # the public code, when not the failure's own
    param: str | None = None  # "prompt" / "format": the API's name for its prompt / output-format field
    retry_after: bool = False


_PROMPT = "prompt"
_FORMAT = "format"
_FAILURES: dict[str, _Mapping] = {
    proto.ERROR_INVALID_REQUEST: _Mapping(400, "invalid_request_error"),
    proto.ERROR_CONTEXT_LENGTH: _Mapping(400, "invalid_request_error", param=_PROMPT),
    proto.ERROR_TEMPLATE: _Mapping(400, "invalid_request_error", param=_PROMPT),
    proto.ERROR_INVALID_SCHEMA: _Mapping(400, "invalid_request_error", param=_FORMAT),
    proto.ERROR_INVALID_TOOL_SCHEMA: _Mapping(400, "invalid_request_error", code=proto.ERROR_INVALID_SCHEMA,
                                              param="tools"),
    proto.ERROR_INTERNAL: _Mapping(500, "server_error", code="server_error"),
    proto.ERROR_SHUTTING_DOWN: _Mapping(503, "server_error"),
    MODEL_NOT_FOUND: _Mapping(404, "invalid_request_error", param="model"),
    NO_WORKER: _Mapping(503, "server_error"),
    QUEUE_FULL: _Mapping(429, "rate_limit_error", retry_after=True),
    WORKER_CRASHED: _Mapping(503, "server_error"),
    GATEWAY_SHUTTING_DOWN: _Mapping(503, "server_error"),
    # A 400: no retry makes it fit (clients retry 5xx); the operator must raise the budget.
    MODEL_TOO_LARGE: _Mapping(400, "invalid_request_error", param="model"),
    MODEL_LOAD_FAILED: _Mapping(503, "server_error"),
    REQUEST_CANCELLED: _Mapping(409, "invalid_request_error"),
}
_UNKNOWN = _Mapping(500, "server_error")


def api_error(failure: EngineError, prompt_param: str | None, format_param: str | None = None) -> APIError:
    """The error an API answers for ``failure``; ``prompt_param`` is that API's prompt field
    (``input`` for Responses, ``messages`` for chat and Messages, ``prompt`` for completions),
    ``format_param`` its structured-output field (``text.format``, ``response_format``,
    ``output_config.format``)."""
    mapping = _FAILURES.get(failure.code, _UNKNOWN)
    param = {_PROMPT: prompt_param, _FORMAT: format_param}.get(mapping.param or "", mapping.param)
    headers = {"Retry-After": "1"} if mapping.retry_after else None
    return APIError(mapping.status, failure.message, mapping.type, param, mapping.code or failure.code, headers)


MODEL_NAME_SHOWN = 256  # characters of an unknown model's name echoed in its 404


def model_not_found(model: str) -> EngineError:
    """The 404 for ``model``, its name cut to ``MODEL_NAME_SHOWN`` characters (a client's 1 MB
    name is not sent back whole) and any lone surrogate escaped (the message must encode)."""
    name = model if len(model) <= MODEL_NAME_SHOWN else model[:MODEL_NAME_SHOWN] + f"… ({len(model)} characters)"
    name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return EngineError(MODEL_NOT_FOUND, f"The model '{name}' does not exist or has no live worker.")


def openai_body(error: APIError) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``"""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


# HTTP status -> Anthropic's error type (and the status Anthropic uses for it).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
_ANTHROPIC_STATUS = {503: 529}  # Anthropic says "overloaded" with 529, which its clients retry


def anthropic_status(error: APIError) -> int:
    return _ANTHROPIC_STATUS.get(error.status, error.status)


def anthropic_type(error: APIError) -> str:
    if error.status in _ANTHROPIC_TYPES:
        return _ANTHROPIC_TYPES[error.status]
    return "invalid_request_error" if error.status < 500 else "api_error"


def anthropic_body(error: APIError) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}``; with no ``param`` field in this shape,
    the message names the field."""
    message = error.message
    if error.param and error.param not in message:
        message = f"{error.param}: {message}"
    return {"type": "error", "error": {"type": anthropic_type(error), "message": message}}
