"""The FastAPI application: Ollama's API (and more) over the scheduler."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from offload.models.store import Store
from offload.planner.errors import OffloadError
from offload.runtime import __version__, config
from offload.runtime.scheduler import Scheduler

__all__ = ["create_app", "error_response"]

log = logging.getLogger(__name__)


def error_response(status: int, message: str) -> JSONResponse:
    """Ollama's error shape."""
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    errs = exc.errors()
    for e in errs:
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return f"invalid JSON: {ctx.get('error', e.get('msg', 'malformed body'))}"
    parts = []
    for e in errs:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


def create_app(store: Store | None = None, scheduler: Scheduler | None = None) -> FastAPI:
    """Build the app; ``store``/``scheduler`` default to the configured ones."""
    store = store or Store(config.models_dir(), read_only_roots=[p for p in [config.ollama_models_dir()] if p])
    scheduler = scheduler or Scheduler(store)
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.close()

    app = FastAPI(title="offload", version=__version__, lifespan=lifespan,
                  description="A local LLM runtime with Ollama- and OpenAI-compatible APIs.")
    app.state.store = store
    app.state.scheduler = scheduler

    @app.exception_handler(OffloadError)
    async def _offload_error(_: Request, exc: OffloadError) -> JSONResponse:
        return error_response(exc.http_status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_message(exc))

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(400, f"invalid JSON: {exc}")

    @app.get("/", response_class=PlainTextResponse)
    @app.head("/", response_class=PlainTextResponse)
    async def root() -> str:
        return "Offload is running"

    @app.get("/api/version")
    async def version() -> dict[str, Any]:
        return {"version": __version__}

    from offload.runtime.server import ollama

    app.include_router(ollama.router)
    try:
        from offload.runtime.server import models_api
    except ImportError:
        models_api = None  # type: ignore[assignment]
    if models_api is not None:
        app.include_router(models_api.router)

    return app
