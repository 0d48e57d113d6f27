"""GET /v1/models (OpenAI's list, or Codex's model catalog), /v1/models/{model}, /v1/workers,
/health and /metrics."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.api.errors import model_not_found
from gateway.engine.aliases import DISCOVERY_PREFIX
from gateway.engine.client import EngineClient
from gateway.engine.registry import WorkerInfo
from gateway.models.manager import ModelManager
from gateway.status.codex_catalog import model_catalog
from gateway.status.served import served_models
from gateway.status.snapshot import worker_view

router = APIRouter()


def _engine(request: Request) -> EngineClient:
    engine: EngineClient = request.app.state.engine
    return engine


def _model_card(model: str, workers: list[WorkerInfo], anthropic: bool = False,
                state: dict[str, Any] | None = None) -> dict[str, Any]:
    """``state``: a listed model's on-demand state (``ModelManager.states``): it is listed
    whether or not it is loaded, with its state beside OpenAI's fields."""
    created = int(min((w.registered_at for w in workers), default=_STARTED))
    if anthropic:  # Anthropic's Models API, under the name Claude Code's discovery keeps (engine/aliases.py)
        stamp = datetime.fromtimestamp(created, timezone.utc).isoformat().replace("+00:00", "Z")
        card: dict[str, Any] = {"type": "model", "id": DISCOVERY_PREFIX + model, "display_name": model, "created_at": stamp,
                "lifecycle": "active", "deprecated_at": None, "retires_at": None}
        window = min((w.context_length for w in workers), default=(state or {}).get("context_length"))
        if window:
            card["max_input_tokens"] = window
        return card
    return {"id": model, "object": "model", "created": created, "owned_by": "mlx-gateway", **(state or {}),
            "kind": _kind(workers, state)}


def _kind(workers: list[WorkerInfo], state: dict[str, Any] | None) -> str:
    """"embedding" or "text": what its workers serve, else what it was when last loaded."""
    if workers:
        return "embedding" if all(w.kind == "embedding" for w in workers) else "text"
    return str((state or {}).get("kind", "text"))


_STARTED = time.time()


def _asks_anthropic(request: Request) -> bool:
    """Anthropic's SDKs and Claude Code (its gateway model discovery) send ``anthropic-version``."""
    return "anthropic-version" in request.headers


def _on_demand(request: Request) -> dict[str, dict[str, Any]]:
    """Each listed model's state, when the gateway serves a model list (``--models``)."""
    models: ModelManager | None = request.app.state.models
    return models.states() if models is not None else {}


@router.get("/v1/models")
async def list_models(request: Request, client_version: str | None = None) -> dict[str, Any]:
    """OpenAI's model list; with ``?client_version=`` (Codex's request) Codex's model catalog;
    with an ``anthropic-version`` header, Anthropic's (``data``, ``has_more``, ``first_id``,
    ``last_id``), which Claude Code's ``/model`` picker lists. Listed on-demand models appear
    whether loaded or not (a request for one loads it), with their ``state``."""
    engine = _engine(request)
    listed = _on_demand(request)
    if client_version is not None:
        now = time.monotonic()
        views = [worker_view(w, now) for w in engine.registry.all()]
        views += [{**state, "model": name, "state": "ready"} for name, state in listed.items()
                  if state["state"] != "loaded" and "context_length" in state]  # known from an earlier load
        return model_catalog(served_models(views))
    serving: dict[str, list[WorkerInfo]] = {name: [] for name in listed}
    for worker in engine.registry.all():
        if worker.serving:
            serving.setdefault(worker.model, []).append(worker)
    names = sorted(serving)
    if _asks_anthropic(request):  # Claude Code's /model picker: models it can talk to
        cards = [_model_card(m, serving[m], True, listed.get(m)) for m in names
                 if _kind(serving[m], listed.get(m)) != "embedding"]
        return {"data": cards, "has_more": False, "first_id": cards[0]["id"] if cards else None,
                "last_id": cards[-1]["id"] if cards else None}
    return {"object": "list", "data": [_model_card(m, serving[m], False, listed.get(m)) for m in names]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    model = model.removeprefix(DISCOVERY_PREFIX)
    workers = [w for w in _engine(request).registry.all() if w.model == model and w.serving]
    state = _on_demand(request).get(model)
    if not workers and state is None:
        raise model_not_found(model)
    return _model_card(model, workers, _asks_anthropic(request), state)


@router.get("/v1/workers")
async def list_workers(request: Request) -> dict[str, Any]:
    """The live workers; with a model list, also every listed model's state and the memory budget."""
    now = time.monotonic()
    reply: dict[str, Any] = {"object": "list", "data": [worker_view(w, now) for w in _engine(request).registry.all()]}
    models: ModelManager | None = request.app.state.models
    if models is not None:
        reply["models"] = models.states()
        reply["memory"] = {"budget_bytes": models.budget, "used_bytes": models.used_bytes()}
    return reply


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    workers = _engine(request).registry.all()
    return {
        "status": "ok",
        "workers": sum(1 for w in workers if w.serving),
        "draining": sum(1 for w in workers if not w.serving),
        "models": _engine(request).registry.models(),
    }


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
