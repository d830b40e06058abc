"""Ollama's /api routes for generation and the model list."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from offload.planner.errors import OffloadError
from offload.runtime import service
from offload.runtime.scheduler import Scheduler
from offload.runtime.server.streaming import ThreadedStream

__all__ = ["router", "respond"]

router = APIRouter()


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    data = json.loads(raw)  # JSONDecodeError -> 400 by the app's handler
    if not isinstance(data, dict):
        raise json.JSONDecodeError("expected a JSON object", raw.decode(errors="replace"), 0)
    return data


def _merge_final(chunks: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Fold streamed chunks into one non-streamed response."""
    final = dict(chunks[-1])
    if key == "response":
        final["response"] = "".join(c.get("response", "") for c in chunks)
    else:
        msg = dict(final.get("message") or {"role": "assistant"})
        msg["content"] = "".join((c.get("message") or {}).get("content", "") for c in chunks)
        final["message"] = msg
    return final


async def respond(make: Callable[[threading.Event], Iterator[dict[str, Any]]], stream: bool,
                  key: str) -> JSONResponse | StreamingResponse:
    """Run a generation; NDJSON stream or one merged object. Errors before output get a status."""
    ts = ThreadedStream(make)
    try:
        first = await ts.next()
    except StopAsyncIteration:
        first = None
    if not stream:
        chunks = [first] if first else []
        async for c in ts:
            chunks.append(c)
        return JSONResponse(_merge_final(chunks, key)) if chunks else JSONResponse({})

    async def lines() -> AsyncIterator[bytes]:
        if first is not None:
            yield (json.dumps(first) + "\n").encode()
        try:
            async for c in ts:
                yield (json.dumps(c) + "\n").encode()
        except OffloadError as e:
            yield (json.dumps({"error": str(e)}) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _sched(request: Request) -> Scheduler:
    return request.app.state.scheduler


@router.post("/api/generate")
async def generate(request: Request) -> Any:
    body = await _body(request)
    sched = _sched(request)
    return await respond(lambda cancel: service.generate(sched, body, cancel), body.get("stream", True) is not False,
                         "response")


@router.post("/api/chat")
async def chat(request: Request) -> Any:
    body = await _body(request)
    sched = _sched(request)
    return await respond(lambda cancel: service.chat(sched, body, cancel), body.get("stream", True) is not False,
                         "message")


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    store = request.app.state.store
    models = []
    for m in store.list():
        d = m.details
        models.append({
            "name": m.name.display, "model": m.name.display,
            "modified_at": m.modified_at.isoformat().replace("+00:00", "Z"),
            "size": m.size_bytes, "digest": m.digest.removeprefix("sha256:"),
            "details": {"parent_model": "", "format": d.get("model_format", "gguf"),
                        "family": d.get("model_family", ""), "families": d.get("model_families") or None,
                        "parameter_size": d.get("model_type", ""), "quantization_level": d.get("file_type", "")},
        })
    return {"models": models}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    import time
    from datetime import UTC, datetime

    out = []
    for r in _sched(request).loaded():
        gpu = sum(d.total_bytes for d in r.plan.devices if d.kind == "GPU")
        total = sum(d.total_bytes for d in r.plan.devices)
        remaining = r.expires_at - time.monotonic()
        expires = (datetime.now(UTC).timestamp() + remaining) if remaining != float("inf") else 4102444800
        out.append({
            "name": r.name, "model": r.name, "size": total, "size_vram": gpu,
            "digest": r.info.digest.removeprefix("sha256:"),
            "details": {"format": "gguf", "family": r.info.config.get("model_family", ""),
                        "parameter_size": r.info.config.get("model_type", ""),
                        "quantization_level": r.info.config.get("file_type", "")},
            "expires_at": datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z"),
            "context_length": r.plan.n_ctx,
            "plan": r.plan.to_dict(),
        })
    return {"models": out}
