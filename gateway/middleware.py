"""What every HTTP request goes through first: its id, the API key check, and its count.

A pure ASGI middleware (no buffering, streams pass straight through):

- the request id is the client's ``x-request-id`` if it sent one, else the id of what the
  route creates (``resp_…``, ``chatcmpl-…``; see ``bind_request_id``); it is returned in the
  ``x-request-id`` header and set for the log lines of this request;
- with API keys configured, ``/v1/*`` needs ``Authorization: Bearer <key>`` or Anthropic's
  ``x-api-key: <key>`` (compared in constant time); ``/health`` and ``/metrics`` stay open
  unless ``protect_metrics``;
- every request is counted by route, model and status.
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import Callable, Sequence

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.error_handlers import error_response
from gateway.errors import APIError
from gateway.metrics import GatewayMetrics
from protocol.logs import current_request_id

_CLIENT_ID = re.compile(r"^[\w.:/+=@-]{1,128}$")


def bind_request_id(request: Request, resource_id: str, model: str | None = None) -> str:
    """Called by a route once it has made its id: unless the client named the request, that id
    becomes the request id. Returns the id to log under (and to pass to the worker)."""
    state = request.scope.setdefault("state", {})
    if model is not None:
        state["model"] = model
    if not state.get("client_request_id"):
        state["request_id"] = resource_id
        current_request_id.set(resource_id)
    return state["request_id"]


class RequestMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, is_known_model: Callable[[str], bool],
                 api_keys: Sequence[str] = (), protect_metrics: bool = False):
        self.app = app
        self.metrics = metrics
        self.is_known_model = is_known_model
        self.api_keys = [key.encode() for key in api_keys]
        self.protect_metrics = protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name: value for name, value in scope["headers"]}
        client_id = headers.get(b"x-request-id", b"").decode("latin-1").strip()
        state = scope.setdefault("state", {})
        state["client_request_id"] = client_id if _CLIENT_ID.match(client_id) else None
        state["request_id"] = state["client_request_id"] or f"req_{uuid.uuid4().hex}"
        token = current_request_id.set(state["request_id"])
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", state["request_id"].encode())]}
            await send(message)

        try:
            if self._needs_key(scope["path"]) and not self._authorized(headers):
                error = APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>' "
                                 "or 'x-api-key: <key>'.", "invalid_request_error", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                await error_response(scope["path"], error)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)
            route = scope.get("route")
            model = state.get("model")
            self.metrics.requests.labels(
                route.path if route is not None else "unmatched",
                model if model and self.is_known_model(model) else "",
                str(status),
            ).inc()

    def _needs_key(self, path: str) -> bool:
        if not self.api_keys:
            return False
        return path.startswith("/v1/") or (self.protect_metrics and path in ("/metrics", "/health"))

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        bearer = headers.get(b"authorization", b"")
        if bearer[:7].lower() == b"bearer ":
            given = bearer[7:].strip()
        else:
            given = headers.get(b"x-api-key", b"").strip()
        if not given:
            return False
        # Compare with every key, always, so timing says nothing about which (if any) matched.
        matches = [hmac.compare_digest(given, key) for key in self.api_keys]
        return any(matches)
