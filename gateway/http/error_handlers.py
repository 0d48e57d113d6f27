"""The app's exception handlers: every error reply, in the shape of the API that was called.

The path says which API family was called (``api/family.py``): its error shape (Anthropic's
under ``/v1/messages``, OpenAI's elsewhere) and, for an ``EngineError``, its own names for
the prompt and format fields in ``param``.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.api.errors import APIError, EngineError
from gateway.api.family import family_for_path

log = logging.getLogger(__name__)

_PARAMETER = re.compile(r"\{[^}]*\}")
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


def error_response(path: str, error: APIError) -> JSONResponse:
    """``error`` as the reply of the API at ``path``."""
    status, body = family_for_path(path).error_status_and_body(error)
    return JSONResponse(body, status_code=status, headers=error.headers)


def validation_error(exc: RequestValidationError | ValidationError) -> APIError:
    """A 400 naming the first field that failed (``param``), as OpenAI's API does."""
    errors = exc.errors()
    first: dict = dict(errors[0]) if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "The request body is not valid JSON.")
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    message = f"{first.get('msg', 'invalid request')}" + (f" (at '{param}')" if param else "")
    return APIError(400, message, param=param)


def allowed_methods(request: Request, fallback: str = "") -> str:
    """The methods ``/openapi.json`` documents for this request's path (its ``Allow`` header),
    GET with HEAD: those of the path itself if it is documented as is, else of every templated
    path that matches it; ``fallback`` for a path it does not document."""
    paths: dict[str, dict] = request.app.openapi().get("paths", {})
    path = request.url.path
    matching = [path] if path in paths else [
        template for template in paths
        if re.fullmatch("[^/]+".join(re.escape(part) for part in _PARAMETER.split(template)), path)]
    methods: list[str] = []
    for template in matching:
        methods += [method.upper() for method in paths[template] if method.upper() in _METHODS
                    and method.upper() not in methods]
    if "GET" in methods:
        methods.insert(methods.index("GET") + 1, "HEAD")
    return ", ".join(methods) or fallback


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
        path = request.url.path
        return error_response(path, family_for_path(path).error(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:  # Starlette lists the first route's methods only (GET, not DELETE)
            headers = {**(headers or {}), "Allow": allowed_methods(request, (headers or {}).get("Allow", ""))}
        error = APIError(exc.status_code, str(exc.detail), kind, headers=headers)
        return error_response(request.url.path, error)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        error = APIError(500, "The server had an error while processing your request.", "server_error")
        return error_response(request.url.path, error)
