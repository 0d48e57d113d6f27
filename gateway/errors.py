"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.engine_client import ERROR_GATEWAY_SHUTTING_DOWN, ERROR_NO_WORKER, ERROR_QUEUE_FULL
from protocol import messages as proto

log = logging.getLogger(__name__)


class APIError(Exception):
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

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist or has no live worker.", param="model", code="model_not_found")


# A worker's error code -> (HTTP status, OpenAI error type).
_WORKER_ERRORS = {
    proto.ERROR_INVALID_REQUEST: (400, "invalid_request_error"),
    proto.ERROR_CONTEXT_LENGTH: (400, "invalid_request_error"),
    proto.ERROR_TEMPLATE: (400, "invalid_request_error"),
    proto.ERROR_OVERLOADED: (503, "server_error"),
    proto.ERROR_SHUTTING_DOWN: (503, "server_error"),
    proto.ERROR_WORKER_CRASHED: (503, "server_error"),
    ERROR_NO_WORKER: (503, "server_error"),
    ERROR_GATEWAY_SHUTTING_DOWN: (503, "server_error"),
}


def overloaded(message: str) -> APIError:
    return APIError(429, message, "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})


def from_worker_error(error: proto.Error) -> APIError:
    if error.code == ERROR_QUEUE_FULL:  # the queue filled between admission and dispatch
        return overloaded(error.message)
    status, type = _WORKER_ERRORS.get(error.code, (500, "server_error"))
    param = "messages" if error.code == proto.ERROR_CONTEXT_LENGTH else None
    return APIError(status, error.message, type, param, error.code)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        else:
            param = ".".join(location) or None
            message = f"{first.get('msg', 'invalid request')}" + (f" (at '{param}')" if param else "")
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("The server had an error while processing your request.", "server_error"), 500)
