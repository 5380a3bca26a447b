"""The app factory. The model is loaded in a thread after startup (so `/health` answers and `/ready` says
503 meanwhile), then the engine starts; a load that fails stops the server (Runtime.on_load_failure);
shutdown drains and stops it. Requests pass the door (server/edge.py) before any route."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from . import generate_api, openai_api, openapi, status, ui
from .edge import EdgeGuard
from .errors import install_error_handlers
from .metrics import RequestMetricsMiddleware
from .runtime import SERVER_VERSION, Loader, Runtime, load_model
from .settings import ServerSettings
from .streaming import ClientGone


def create_app(settings: ServerSettings, loader: Loader = load_model) -> FastAPI:
    runtime = Runtime(settings, loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        yield
        await runtime.begin_shutdown()

    app = FastAPI(title="CRSM server", version=SERVER_VERSION, lifespan=lifespan)
    app.state.runtime = runtime
    install_error_handlers(app)
    # the metrics count what the door refuses too (as "unmatched": no route was reached)
    app.add_middleware(EdgeGuard, settings=settings)
    app.add_middleware(RequestMetricsMiddleware, metrics=runtime.metrics)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; recorded in the request metrics

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    app.add_api_route("/health", health, methods=["HEAD"])   # load balancers probe with HEAD

    @app.get("/ready")
    async def ready() -> JSONResponse:
        runtime.require_engine()
        return JSONResponse({"status": "ready", "model": runtime.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = runtime.metrics.render()
        return Response(body, media_type=content_type)

    app.include_router(openai_api.router)
    app.include_router(generate_api.router)
    app.include_router(status.router)
    if settings.ui:
        ui.mount(app)
    openapi.install(app, runtime)
    return app
