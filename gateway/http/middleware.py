"""What every HTTP request goes through first: its id, the API key check, and its count.

A pure ASGI middleware (no buffering, streams pass straight through):

- the request id is the client's ``x-request-id`` if it sent one, else the id of what the
  route creates (``resp_…``, ``chatcmpl-…``; see ``api/generation.bind_request_id``); it is returned in the
  ``x-request-id`` header and set for the log lines of this request;
- with API keys configured, ``/v1/*`` needs ``Authorization: Bearer <key>`` or Anthropic's
  ``x-api-key: <key>`` (compared in constant time); ``/health`` and ``/metrics`` stay open
  unless ``protect_metrics``;
- the body is read whole (413 past ``max_body_bytes``) and, if it is JSON, checked once for
  every route (``json_body.check_json``: nesting depth, lone surrogates: a 400 naming the field);
- every request is counted by route, model and status (``count_request``).

Every scope gets ``state["transport"]``: the connection's transport where the server is uvicorn
(None elsewhere), which ASGI does not expose; ``websocket.py`` and ``sse.py`` bound its send
buffer and drop it when its client stops reading.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Callable, Sequence
from typing import cast

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api.errors import APIError, openai_body
from gateway.http.error_handlers import error_response
from gateway.http.json_body import check_json
from protocol.logs import current_request_id

_CLIENT_ID = re.compile(r"^[\w.:/+=@-]{1,128}$")
_MISSING_KEY = APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                        "invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def caller(scope: Scope) -> str:
    """Who is calling, as the middleware found: a hash of their API key ("" with no keys).
    What one caller stores, only it can see."""
    return str(scope.get("state", {}).get("owner", ""))


class RequestMiddleware:
    def __init__(self, app: ASGIApp, count_request: Callable[[str, str, str], None], is_known_model: Callable[[str], bool],
                 api_keys: Sequence[str] = (), protect_metrics: bool = False, max_body_bytes: int = 4 << 20):
        self.app = app
        self.count_request = count_request
        self.is_known_model = is_known_model
        self.api_keys = [key.encode() for key in api_keys]
        self.protect_metrics = protect_metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            headers = {name: value for name, value in scope["headers"]}
            owner = self._caller(headers)
            if self._needs_key(scope["path"]) and owner is None:
                await _refuse_websocket(scope, receive, send)
                return
            state = scope.setdefault("state", {})
            state["owner"] = owner or ""
            state["transport"] = _transport_of(send)
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name: value for name, value in scope["headers"]}
        client_id = headers.get(b"x-request-id", b"").decode("latin-1").strip()
        state = scope.setdefault("state", {})
        state["transport"] = _transport_of(send)  # a stream that stalls is dropped through it (sse.py)
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
            owner = self._caller(headers)
            if self._needs_key(scope["path"]) and owner is None:
                await error_response(scope["path"], _MISSING_KEY)(scope, receive, send_with_id)
                return
            state["owner"] = owner or ""
            body = await self._read_body(headers, receive)
            if body is None:
                too_large = APIError(413, f"The request body is larger than {self.max_body_bytes} bytes.",
                                     code="request_too_large")
                await error_response(scope["path"], too_large)(scope, receive, send_with_id)
                return
            if body and _is_json(headers):
                try:
                    check_json(body)
                except APIError as refused:
                    await error_response(scope["path"], refused)(scope, receive, send_with_id)
                    return
            await self.app(scope, _replay(body, receive), send_with_id)
        finally:
            current_request_id.reset(token)
            model = state.get("model")
            self.count_request(_route_path(scope), model if model and self.is_known_model(model) else "", str(status))

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes | None:
        """The whole body, or None past ``max_body_bytes`` (refused before the JSON is parsed,
        let alone tokenized by a worker). Bodies here are JSON of at most a few MB: reading them
        before the route costs nothing the route would not spend anyway."""
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _needs_key(self, path: str) -> bool:
        if not self.api_keys:
            return False
        return path.startswith("/v1/") or (self.protect_metrics and path in ("/metrics", "/health"))

    def _caller(self, headers: dict[bytes, bytes]) -> str | None:
        """Who is calling, as the owner of what they store: a hash of the API key they gave
        ("" when no keys are configured), or None without a valid key."""
        if not self.api_keys:
            return ""
        bearer = headers.get(b"authorization", b"")
        if bearer[:7].lower() == b"bearer ":
            given = bearer[7:].strip()
        else:
            given = headers.get(b"x-api-key", b"").strip()
        if not given:
            return None
        # Compare with every key, always, so timing says nothing about which (if any) matched.
        matches = [hmac.compare_digest(given, key) for key in self.api_keys]
        return owner_of(given) if any(matches) else None


async def _refuse_websocket(scope: Scope, receive: Receive, send: Send) -> None:
    """No upgrade without a key: a 401 with the error body where the server can send one
    (ASGI's denial-response extension), else a close with 1008 (policy violation)."""
    await receive()  # websocket.connect
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": "Incorrect or missing API key."})
        return
    body = json.dumps(openai_body(_MISSING_KEY)).encode()
    await send({"type": "websocket.http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
    await send({"type": "websocket.http.response.body", "body": body})


def _is_json(headers: dict[bytes, bytes]) -> bool:
    """Whether FastAPI will parse the body as JSON: its content type says so, or it has none
    (FastAPI then reads JSON too)."""
    media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    return not media or media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def _route_path(scope: Scope) -> str:
    """The route a request is counted under: the one that served it, else (a body refused here,
    before routing) its path when that is one the app documents; "unmatched" otherwise."""
    route = scope.get("route")
    if route is not None:
        return str(route.path)
    openapi = getattr(scope.get("app"), "openapi", None)
    documented = openapi()["paths"] if callable(openapi) else {}  # FastAPI builds it once and keeps it
    return str(scope["path"]) if scope["path"] in documented else "unmatched"


def _transport_of(send: Send) -> asyncio.Transport | None:
    """The transport under uvicorn's ``send`` (a method of its protocol or request object), or
    None. An HTTP ``send`` reaches us wrapped by Starlette's error middleware (a closure around
    uvicorn's), so the wrappers' closures are searched too, a few levels deep."""
    pending: list[object] = [send]
    for _ in range(8):
        if not pending:
            break
        candidate = pending.pop()
        transport = getattr(getattr(candidate, "__self__", None), "transport", None)
        if all(callable(getattr(transport, name, None)) for name in ("abort", "get_extra_info")):
            return cast(asyncio.Transport, transport)
        cells = getattr(candidate, "__closure__", None) or ()
        for cell in cells:
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(contents):
                pending.append(contents)
    return None


def owner_of(key: bytes) -> str:
    """What stored responses keep of the key that made them: a hash, never the key."""
    return hashlib.sha256(b"mlx-gateway owner:" + key).hexdigest()[:32]


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app: the body read already, then whatever comes next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
