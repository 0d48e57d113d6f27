"""The FastAPI application: routes, error handlers, and the engine client's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.engine_client import EngineClient
from gateway.errors import install_handlers
from gateway.routes import chat, completions, models


def create_app(engine: EngineClient) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.close()

    app = FastAPI(title="mlx-gateway", lifespan=lifespan)
    app.state.engine = engine
    install_handlers(app)
    for module in (models, chat, completions):
        app.include_router(module.router)
    return app
