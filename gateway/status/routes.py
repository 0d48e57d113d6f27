"""GET /v1/models (OpenAI's list, or Codex's model catalog), /v1/models/{model}, /v1/workers,
/health and /metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.api.errors import model_not_found
from gateway.engine.client import EngineClient
from gateway.engine.registry import WorkerInfo
from gateway.status.codex_catalog import model_catalog
from gateway.status.served import served_models

router = APIRouter()


def _engine(request: Request) -> EngineClient:
    engine: EngineClient = request.app.state.engine
    return engine


def _model_card(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "mlx-gateway"}


@router.get("/v1/models")
async def list_models(request: Request, client_version: str | None = None) -> dict[str, Any]:
    """OpenAI's model list; with ``?client_version=`` (Codex's request) Codex's model catalog."""
    engine = _engine(request)
    if client_version is not None:
        now = time.monotonic()
        return model_catalog(served_models(_worker_view(w, now) for w in engine.registry.all()))
    created: dict[str, int] = {}
    for worker in engine.registry.all():
        if not worker.serving:
            continue
        created[worker.model] = min(created.get(worker.model, 1 << 62), int(worker.registered_at))
    return {"object": "list", "data": [_model_card(m, created[m]) for m in sorted(created)]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    workers = [w for w in _engine(request).registry.all() if w.model == model and w.serving]
    if not workers:
        raise model_not_found(model)
    return _model_card(model, int(min(w.registered_at for w in workers)))


def _worker_view(w: WorkerInfo, now: float) -> dict[str, Any]:
    return {
        "id": w.worker_id,
        "model": w.model,
        "pid": w.pid,
        "state": w.state.value,
        "context_length": w.context_length,
        "tool_calls": w.tool_calls,
        "thinking": w.thinking,
        "max_sequences": w.max_sequences,
        "in_flight": len(w.in_flight),
        "active": w.active,
        "queued": w.queued,
        "last_heartbeat_s": round(now - w.last_seen, 3),
    }


@router.get("/v1/workers")
async def list_workers(request: Request) -> dict[str, Any]:
    now = time.monotonic()
    return {"object": "list", "data": [_worker_view(w, now) for w in _engine(request).registry.all()]}


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
