"""The status page: ``/`` and ``/status`` serve it (assets shipped in the package, no CDN);
``/v1/status`` is one snapshot and ``/v1/status/events`` a snapshot a second as SSE, both behind
the API key like every /v1 route (the page asks for the key and keeps it in the browser's
session storage, never in a URL). ``POST /v1/requests/{id}/cancel`` is the page's one action of
its own; loading, unloading and pinning a model are the model routes' (``models/routes.py``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from gateway.api.errors import APIError
from gateway.engine.client import EngineClient
from gateway.status.snapshot import snapshot

router = APIRouter()

_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
SNAPSHOT_INTERVAL_S = 1.0


def _snapshot(request: Request) -> dict[str, Any]:
    state = request.app.state
    return snapshot(state.engine, state.models, state.metrics.activity)


def _asset(name: str) -> bytes:
    return resources.files("gateway.status").joinpath("static").joinpath(name).read_bytes()


@router.get("/", include_in_schema=False)
@router.get("/status", include_in_schema=False)
async def page() -> Response:
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-store", "Content-Security-Policy": "default-src 'self'"})


@router.get("/status/assets/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in _ASSETS:
        raise APIError(404, f"No asset '{name[:64]}'.", code="not_found")
    return Response(_asset(name), media_type=_ASSETS[name], headers={"Cache-Control": "no-store"})


@router.get("/v1/status")
async def status(request: Request) -> dict[str, Any]:
    return _snapshot(request)


@router.get("/v1/status/events", include_in_schema=False)  # an endless stream: README documents it
async def status_events(request: Request) -> StreamingResponse:
    """A snapshot a second, as SSE ``data:`` lines, while the page is open."""

    async def snapshots() -> AsyncGenerator[bytes, None]:
        while True:
            yield b"data: " + json.dumps(_snapshot(request), separators=(",", ":")).encode() + b"\n\n"
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)

    return StreamingResponse(snapshots(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.post("/v1/requests/{request_id}/cancel")
async def cancel_request(request_id: str, request: Request) -> dict[str, Any]:
    engine: EngineClient = request.app.state.engine
    if not engine.cancel_request(request_id, "cancelled by the operator"):
        raise APIError(404, f"No running request '{request_id[:128]}'.", param="request_id", code="not_found")
    return {"id": request_id, "cancelled": True}
