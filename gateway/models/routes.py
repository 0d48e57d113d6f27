"""POST /v1/models/{model}/load and /unload: an operator prewarms a listed model or frees its
memory. Behind the API key like every /v1 route."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from gateway.api.errors import APIError
from gateway.models.manager import ModelManager

router = APIRouter()


def _manager(request: Request, model: str) -> ModelManager:
    models: ModelManager | None = request.app.state.models
    if models is None or not models.manages(model):
        raise APIError(404, f"The model '{model[:256]}' is not in this gateway's model list (gateway --models), so "
                            "it cannot be loaded or unloaded on demand.", param="model", code="model_not_found")
    return models


def _card(models: ModelManager, model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", **models.states()[model]}


@router.post("/v1/models/{model:path}/load")
async def load_model(model: str, request: Request) -> dict[str, Any]:
    """Load now (or join the load in progress); answers once it serves, or with why it failed."""
    models = _manager(request, model)
    await models.load(model)
    return _card(models, model)


@router.post("/v1/models/{model:path}/unload")
async def unload_model(model: str, request: Request) -> dict[str, Any]:
    """Unload now; a 409 while it has requests running or waiting (they are never cut off)."""
    models = _manager(request, model)
    refusal = await models.unload(model)
    if refusal is not None:
        raise APIError(409, refusal, code="model_busy")
    return _card(models, model)


@router.post("/v1/models/{model:path}/pin")
async def pin_model(model: str, request: Request) -> dict[str, Any]:
    """``{"pinned": true}``: never unloaded when idle or to make room (``false`` undoes it)."""
    models = _manager(request, model)
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("pinned"), bool):
        raise APIError(400, "Send {\"pinned\": true} or {\"pinned\": false}.", param="pinned")
    models.pin(model, body["pinned"])
    return _card(models, model)
