"""The FastAPI application: routes, error handlers, and the engine client's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.anthropic import routes as messages
from gateway.chat import routes as chat
from gateway.embeddings import routes as embeddings
from gateway.engine.client import EngineClient
from gateway.http.error_handlers import install_handlers
from gateway.http.middleware import RequestMiddleware
from gateway.http.openapi import describe_errors
from gateway.http.sse import KEEPALIVE_S
from gateway.models import routes as model_routes
from gateway.models.manager import ModelManager
from gateway.responses import routes as responses
from gateway.responses import websocket_routes as responses_ws
from gateway.responses.service import ResponsesService
from gateway.responses.store import ResponseStore
from gateway.responses.websocket_routes import ConnectionLimit
from gateway.status import page as status_page
from gateway.status import routes as status
from gateway.status.metrics import GatewayMetrics


def create_app(
    engine: EngineClient,
    store: ResponseStore,
    api_keys: Sequence[str] = (),
    protect_metrics: bool = False,
    websockets: ConnectionLimit | None = None,
    max_body_bytes: int = 4 << 20,
    models: ModelManager | None = None,
    keepalive_s: float = KEEPALIVE_S,
) -> FastAPI:
    """``models``: the on-demand models (``--models``), loaded when a request needs one;
    ``keepalive_s``: seconds of silence before a stream gets a keep-alive."""
    service = ResponsesService(engine, store)
    metrics = GatewayMetrics()
    metrics.attach(engine, lambda: store.size)
    engine.observer = metrics
    service.on_compaction = metrics.compaction
    if models is not None:
        engine.on_demand = models
        models.events = metrics
        metrics.watch_models(models)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        await service.start()
        if models is not None:
            await models.start()
        try:
            yield
        finally:
            await service.close()
            if models is not None:
                await models.close()
            await engine.close()
            await store.close()

    app = FastAPI(title="mlx-gateway", lifespan=lifespan)
    app.state.engine = engine
    app.state.responses = service
    app.state.metrics = metrics
    app.state.models = models
    app.state.keepalive_s = keepalive_s
    app.state.websockets = websockets or ConnectionLimit()
    app.state.send_timeout = app.state.websockets.send_timeout  # SSE streams too (http/sse.py)
    app.add_middleware(RequestMiddleware, count_request=metrics.count_request, is_known_model=engine.registry.is_known,
                       api_keys=api_keys, protect_metrics=protect_metrics, max_body_bytes=max_body_bytes)
    install_handlers(app)
    describe_errors(app)
    for module in (model_routes, status_page, status, chat, responses, responses_ws, messages,
                   embeddings):
        app.include_router(module.router)
    return app
