"""Ollama's /api routes: generate, chat, embed, embeddings, tags, ps."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from offload.runtime.server.schemas import (
    ChatRequest,
    ChatResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ListResponse,
    ProcessResponse,
)
from offload.runtime.server.streaming import (
    CancellingStreamingResponse,
    ThreadedStream,
    first_chunk,
    stream_events,
)
from offload.runtime.serving import embeddings, planning, service
from offload.runtime.serving.scheduler import Runner, Scheduler

__all__ = ["router", "respond", "running_model", "merge_chunks", "collect", "until_hangup"]

log = logging.getLogger(__name__)
router = APIRouter(tags=["ollama"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad request"},
    404: {"model": ErrorResponse, "description": "Model not found"},
    503: {"model": ErrorResponse, "description": "Server busy"},
}


def _ndjson(model: type) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "model": model,
            "content": {"application/x-ndjson": {}},
            "description": "One object, or NDJSON chunks when streaming",
        },
        **_ERRORS,
    }


def merge_chunks(chunks: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Fold streamed chunks into one non-streamed response."""
    final = dict(chunks[-1])
    if key == "response":
        final["response"] = "".join(c.get("response", "") for c in chunks)
        thinking = "".join(c.get("thinking") or "" for c in chunks)
        if thinking:
            final["thinking"] = thinking
    else:
        msg = dict(final.get("message") or {"role": "assistant"})
        msg["content"] = "".join((c.get("message") or {}).get("content") or "" for c in chunks)
        thinking = "".join((c.get("message") or {}).get("thinking") or "" for c in chunks)
        if thinking:
            msg["thinking"] = thinking
        final["message"] = msg
    logprobs = [lp for c in chunks for lp in c.get("logprobs") or []]
    if logprobs:
        final["logprobs"] = logprobs
    return final


async def collect(ts: ThreadedStream, request: Request | None = None) -> list[dict[str, Any]]:
    """Every chunk of a stream (errors propagate to the app's handlers).

    A client that hangs up on a non-streamed request is noticed by polling, so its generation
    stops too instead of running to ``num_predict`` for nobody.
    """

    async def watch() -> None:
        while not ts.cancel.is_set():
            if request is not None and await request.is_disconnected():
                ts.cancel.set()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        return [c async for c in ts]
    finally:
        watcher.cancel()


T = TypeVar("T")


async def until_hangup(request: Request, work: Callable[[threading.Event], T]) -> T:
    """``work(cancel)`` in a worker thread, with ``cancel`` set if the client hangs up meanwhile
    (noticed by polling, as ``collect`` does), so that work nobody waits for stops early."""
    cancel = threading.Event()

    async def watch() -> None:
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        return await run_in_threadpool(work, cancel)
    finally:
        watcher.cancel()


async def respond(
    make: Callable[[threading.Event], Iterator[dict[str, Any]]],
    stream: bool,
    key: str,
    request: Request | None = None,
) -> JSONResponse | CancellingStreamingResponse:
    """Run a generation; NDJSON stream or one merged object. Errors before output get a status."""
    ts = ThreadedStream(make)
    if not stream:
        chunks = await collect(ts, request)
        return JSONResponse(merge_chunks(chunks, key) if chunks else {})
    # Headers go out once the request is accepted (queued for its model), so a client can cancel
    # a request that waits; errors found before that still get their status code.
    first = await first_chunk(ts)
    lines = stream_events(
        ts,
        first,
        lambda c: [_ndjson_line(c)],
        list,
        lambda message: _ndjson_line({"error": message}),
    )
    return CancellingStreamingResponse(lines, ts, media_type="application/x-ndjson")


def _ndjson_line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def _sched(request: Request) -> Scheduler:
    return request.app.state.scheduler


@router.post("/api/generate", responses=_ndjson(GenerateResponse), response_model=None)
async def generate(body: GenerateRequest, request: Request) -> Any:
    """Generate a completion for a prompt."""
    sched = _sched(request)
    return await respond(
        lambda cancel: service.generate(sched, body, cancel),
        body.stream is not False,
        "response",
        request,
    )


@router.post("/api/chat", responses=_ndjson(ChatResponse), response_model=None)
async def chat(body: ChatRequest, request: Request) -> Any:
    """Generate the next message of a chat."""
    sched = _sched(request)
    return await respond(
        lambda cancel: service.chat(sched, body, cancel),
        body.stream is not False,
        "message",
        request,
    )


@router.post("/api/embed", response_model=EmbedResponse, responses=_ERRORS)
async def embed(body: EmbedRequest, request: Request) -> dict[str, Any]:
    """Embeddings of one input or a list of inputs (unit length)."""
    # An empty string is no input, as in Ollama: the model is loaded and nothing is embedded.
    inputs = (
        ([body.input] if body.input else []) if isinstance(body.input, str) else list(body.input)
    )
    keep = service.keep_alive_from(body.keep_alive)
    sched = _sched(request)
    out = await until_hangup(
        request,
        lambda cancel: embeddings.embed(
            sched,
            body.model,
            inputs,
            body.truncate is not False,
            body.dimensions,
            body.options,
            keep,
            cancel,
        ),
    )
    return {
        "model": body.model,
        "embeddings": out.embeddings,
        "total_duration": int(out.total_s * 1e9),
        "load_duration": int(out.load_s * 1e9),
        "prompt_eval_count": out.prompt_eval_count,
    }


@router.post("/api/embeddings", response_model=EmbeddingsResponse, responses=_ERRORS)
async def embeddings_legacy(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
    """The older single-prompt embedding endpoint."""
    keep = service.keep_alive_from(body.keep_alive)
    # An empty prompt embeds nothing, but the model is still found and loaded, as in Ollama (and
    # as /api/embed does): an unknown model is a 404, bad options a 400.
    inputs = [body.prompt] if body.prompt else []
    out = await run_in_threadpool(
        embeddings.embed, _sched(request), body.model, inputs, True, None, body.options, keep
    )
    return {"embedding": out.embeddings[0] if out.embeddings else []}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _details(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": config.get("model_format", "gguf"),
        "family": config.get("model_family", ""),
        "families": config.get("model_families") or None,
        "parameter_size": config.get("model_type", ""),
        "quantization_level": config.get("file_type", ""),
    }


@router.get("/api/tags", response_model=ListResponse)
@router.head("/api/tags", include_in_schema=False)
async def tags(request: Request) -> dict[str, Any]:
    """The models in the store."""
    models = []
    for m in await run_in_threadpool(planning.list_models, request.app.state.store):
        models.append(
            {
                "name": m.name.display,
                "model": m.name.display,
                "modified_at": m.modified_at.isoformat().replace("+00:00", "Z"),
                "size": m.size_bytes,
                "digest": m.digest.removeprefix("sha256:"),
                "details": _details(m.details),
            }
        )
    return {"models": models}


# Ollama writes a far-future expiry for models kept forever.
_FOREVER_TS = 4102444800.0


def running_model(r: Runner) -> dict[str, Any]:
    """One /api/ps entry: sizes, expiry, context and our plan."""
    total, gpu = r.memory()
    remaining = r.expires_at - time.monotonic()
    if r.busy and r.expires_at == float("inf"):
        remaining = r.keep_alive_s  # in use: it expires keep_alive after this request
    now = time.time()
    # A keep_alive past the far-future date (1e300 seconds, "99999999999999h") is forever too:
    # no date can be written for it.
    expires = _FOREVER_TS if remaining >= _FOREVER_TS - now else now + max(0.0, remaining)
    return {
        "name": r.name,
        "model": r.name,
        "size": total,
        "size_vram": gpu,
        "digest": r.info.digest.removeprefix("sha256:"),
        "details": _details(r.info.config),
        "expires_at": _iso(expires),
        "context_length": r.plan.n_ctx,
        "plan": r.plan.to_dict(),
        "memory": r.proc.memory_report(),
        # Beyond Ollama's fields: the runner process, its parallel sequences, and what a healing
        # load gave up or turned off on this machine.
        "pid": r.proc.pid,
        "parallel": r.proc.n_parallel,
        "gave_up": list(r.gave_up),
        "safety": list(r.safety),
    }


@router.get("/api/ps", response_model=ProcessResponse)
async def ps(request: Request) -> dict[str, Any]:
    """The loaded models."""
    return {"models": [running_model(r) for r in _sched(request).loaded()]}
