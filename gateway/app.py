"""The FastAPI application: routes, error handlers, and the engine client's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.engine_client import EngineClient
from gateway.error_handlers import install_handlers
from gateway.metrics import GatewayMetrics
from gateway.middleware import RequestMiddleware
from gateway.responses.service import ResponsesService
from gateway.responses.store import ResponseStore
from gateway.routes import chat, completions, messages, models, responses


def create_app(
    engine: EngineClient,
    store: ResponseStore,
    api_keys: Sequence[str] = (),
    protect_metrics: bool = False,
) -> FastAPI:
    service = ResponsesService(engine, store)
    metrics = GatewayMetrics()
    metrics.attach(engine, store)
    engine.observer = metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await service.close()
            await engine.close()
            await store.close()

    app = FastAPI(title="mlx-gateway", lifespan=lifespan)
    app.state.engine = engine
    app.state.responses = service
    app.state.metrics = metrics
    app.add_middleware(RequestMiddleware, metrics=metrics, is_known_model=engine.registry.is_known,
                       api_keys=api_keys, protect_metrics=protect_metrics)
    install_handlers(app)
    for module in (models, chat, completions, responses, messages):
        app.include_router(module.router)
    return app
