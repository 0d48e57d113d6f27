"""``/openapi.json`` as the server really answers: each API's error shape and statuses, no 422.

FastAPI documents a 422 validation error that this server never sends (bad bodies are 400s
in the API's own shape, ``error_handlers.py``) and none of the errors it does send. This
rewrites every operation's responses: the errors of its API family (OpenAI's, or Anthropic's
under ``/v1/messages``), ``text/event-stream`` beside JSON where a route streams, and
Prometheus' text format (not JSON) for ``/metrics``. Integer fields take ``463.0`` as JSON
Schema's ``integer`` does (``json_body.Integer``); an undocumented method gets 405 with every
documented method of the path in ``Allow`` (``error_handlers.py``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.api.family import family_for_path

_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"],
                                                         "properties": {"type": {"type": "string"},
                                                                        "message": {"type": "string"}}}},
}
_OPENAI_STATUSES = {
    "400": "Invalid request: malformed JSON, a field out of range, a prompt longer than the context",
    "401": "Missing or wrong API key (when the gateway requires one)",
    "404": "Unknown model, or no such stored response",
    "413": "Request body over the size limit",
    "429": "The model's queue is full; retry after Retry-After seconds",
    "500": "Internal error",
    "503": "No live worker for the model, or the gateway is shutting down",
}
_ANTHROPIC_STATUSES = {**{k: v for k, v in _OPENAI_STATUSES.items() if k != "503"},
                       "529": "Overloaded: no live worker for the model, or the gateway is shutting down"}
_NOT_JSON = {"/metrics": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}
_STREAMING = {"/v1/responses", "/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses/{response_id}"}


def describe_errors(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _rewrite(get_openapi(title=app.title, version=app.version, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _rewrite(schema: dict[str, Any]) -> dict[str, Any]:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["OpenAIError"] = _OPENAI_ERROR
    components["AnthropicError"] = _ANTHROPIC_ERROR
    for path, operations in schema.get("paths", {}).items():
        anthropic = family_for_path(path).error_shape == "anthropic"
        statuses = _ANTHROPIC_STATUSES if anthropic else _OPENAI_STATUSES
        reference = {"$ref": f"#/components/schemas/{'AnthropicError' if anthropic else 'OpenAIError'}"}
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1/") or path == "/health":
                for status, description in statuses.items():
                    responses[status] = {"description": description, "content": {"application/json": {"schema": reference}}}
            ok = responses.get("200")
            if ok is not None and path in _NOT_JSON:
                ok["content"] = _NOT_JSON[path]
            if ok is not None and path in _STREAMING and method in ("post", "get"):
                ok.setdefault("content", {})["text/event-stream"] = {"schema": {"type": "string"}}
    return schema
