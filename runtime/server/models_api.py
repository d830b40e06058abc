"""Ollama's model-management endpoints: pull, push, create, show, copy, delete, blobs.

Request and response shapes follow Ollama's docs/api.md. Progress streams as NDJSON (one JSON
object per line); with ``"stream": false`` one object answers. Errors are ``{"error": ...}`` with
the error's status, or an ``{"error": ...}`` line once a stream has begun.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.requests import ClientDisconnect

from offload.models import embedded, registry
from offload.models.create import check_sources, create
from offload.models.errors import BlobNotFound, ModelError
from offload.models.layout import check_digest
from offload.models.modelfile import ROLES, Message, Modelfile, coerce_parameter, parse_modelfile
from offload.models.names import parse_name
from offload.models.show import show
from offload.models.store import Store
from offload.planner.errors import OffloadError
from offload.runtime import config
from offload.runtime.errors import BadRequest
from offload.runtime.server.errors import error_response
from offload.runtime.server.uploads import receive_blob

__all__ = ["router"]

log = logging.getLogger(__name__)
router = APIRouter()

Progress = Callable[[dict[str, Any]], None]


def _store(request: Request) -> Store:
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise ModelError("the server has no model store configured")
    return store


def _error(exc: OffloadError) -> JSONResponse:
    return error_response(exc.http_status, str(exc))


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")


class PullRequest(_Req):
    """Body of /api/pull and /api/push."""

    model: str | None = None
    name: str | None = None  # the older spelling
    insecure: bool = False
    stream: bool = True

    def target(self) -> str:
        """The model name, whichever field carried it."""
        return self.model or self.name or ""


class CreateRequest(_Req):
    """Body of /api/create: a Modelfile's text (older API) or its parts (current API)."""

    model: str | None = None
    name: str | None = None
    modelfile: str | None = None
    from_: str | None = None
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    quantize: str | None = None
    stream: bool = True

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ShowRequest(_Req):
    """Body of /api/show and /api/delete."""

    model: str | None = None
    name: str | None = None
    verbose: bool = False


class CopyRequest(_Req):
    """Body of /api/copy."""

    source: str
    destination: str


def _ndjson(run: Callable[[Progress], Any]) -> Iterator[bytes]:
    """Run ``run(progress)`` in a thread; yield each progress object as a JSON line."""
    q: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def work() -> None:
        try:
            run(q.put)
        except OffloadError as e:
            q.put({"error": str(e)})
        except Exception as e:  # noqa: BLE001 - reported to the client, logged in full
            log.exception("model operation failed")
            q.put({"error": f"internal error: {e}"})
        finally:
            q.put(None)

    threading.Thread(target=work, name="offload-models-op", daemon=True).start()
    while (item := q.get()) is not None:
        yield json.dumps(item).encode() + b"\n"


async def _respond(stream: bool, run: Callable[[Progress], Any]) -> Response:
    if stream:
        return StreamingResponse(_ndjson(run), media_type="application/x-ndjson")
    try:
        await run_in_threadpool(run, lambda _: None)
    except OffloadError as e:
        return _error(e)
    return JSONResponse({"status": "success"})


@router.post("/api/pull")
async def api_pull(body: PullRequest, request: Request) -> Response:
    """Pull a model; streams Ollama's progress objects."""
    store = _store(request)
    try:
        name = parse_name(body.target())
    except OffloadError as e:
        return _error(e)
    return await _respond(
        body.stream, lambda on: registry.pull(store, name, insecure=body.insecure, progress=on)
    )


@router.post("/api/push")
async def api_push(body: PullRequest, request: Request) -> Response:
    """Push a model; streams Ollama's progress objects."""
    store = _store(request)
    try:
        name = parse_name(body.target())
        store.locate_manifest(name)
    except OffloadError as e:
        return _error(e)
    return await _respond(
        body.stream, lambda on: registry.push(store, name, insecure=body.insecure, progress=on)
    )


def _modelfile_from_request(store: Store, body: CreateRequest) -> Modelfile:
    extra = body.model_extra or {}
    if body.modelfile:
        return parse_modelfile(body.modelfile)
    source = body.from_ or extra.get("from")
    if body.files:
        # Files were uploaded with POST /api/blobs; FROM the model file's blob.
        digest = check_digest(next(iter(body.files.values())))
        path = store.find_blob(digest)
        if path is None:
            raise BlobNotFound(digest)
        source = str(path)
    if not source:
        raise BadRequest('create needs "from" (a model name), "files" or "modelfile"')
    params: dict[str, Any] = {}
    for key, value in (body.parameters or {}).items():
        values = value if isinstance(value, list) else [value]
        coerced = [coerce_parameter(key, v) for v in values]
        params[key.lower()] = coerced if key.lower() == "stop" else coerced[-1]
    adapters = []
    for digest in (body.adapters or {}).values():
        path = store.find_blob(check_digest(digest))
        if path is None:
            raise BlobNotFound(check_digest(digest), "adapter blob")
        adapters.append(str(path))
    licenses = [body.license] if isinstance(body.license, str) else list(body.license or [])
    return Modelfile(
        from_=source,
        parameters=params,
        template=body.template,
        system=body.system,
        adapters=adapters,
        licenses=licenses,
        messages=[_message(i, m) for i, m in enumerate(body.messages or [])],
    )


def _message(i: int, m: dict[str, Any]) -> Message:
    """One of a create request's ``messages``: what a Modelfile MESSAGE line may say."""
    role, content = m.get("role"), m.get("content", "")
    if not isinstance(role, str) or role.lower() not in ROLES:
        shown = json.dumps(role, default=str)[:40]
        raise BadRequest(f"messages[{i}]: role {shown} is not one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}]: content must be a string, not {type(content).__name__}")
    return Message(role.lower(), content)


def _allowed_dirs(store: Store) -> list[Path]:
    """Folders a request over HTTP may name files in: the stores' blobs and the user's choice."""
    return [*config.allowed_paths(), *(s.blobs_dir for s in [store, *store.fallbacks])]


def _precheck(store: Store, mf: Modelfile, allowed: list[Path], quantize: str | None) -> None:
    embedded.ensure(store, mf.from_)
    check_sources(store, mf, base_dir=Path.cwd(), allowed_dirs=allowed, quantize=quantize)


@router.post("/api/create")
async def api_create(body: CreateRequest, request: Request) -> Response:
    """Create a model from a Modelfile or its parts."""
    store = _store(request)
    allowed = _allowed_dirs(store)
    try:
        name = parse_name(body.model or body.name or "")
        mf = _modelfile_from_request(store, body)
        # Everything the request names is checked before the answer starts, so a bad file gets
        # its status (400, not a 200 stream that ends in an error) and nothing is written.
        await run_in_threadpool(_precheck, store, mf, allowed, body.quantize)
    except OffloadError as e:
        return _error(e)

    def run(on: Progress) -> None:
        quantizer = None
        if body.quantize:
            from offload.runtime.serving.quantize import quantize_gguf

            quantizer = quantize_gguf
        create(store, name, mf, quantize=body.quantize, quantizer=quantizer, progress=on,
               allowed_dirs=allowed)  # fmt: skip

    return await _respond(body.stream, run)


@router.post("/api/show")
async def api_show(body: ShowRequest, request: Request) -> Response:
    """Modelfile, parameters, template, details and GGUF metadata of a model."""
    store = _store(request)
    try:
        embedded.ensure(store, body.model or body.name or "")
        info = await run_in_threadpool(show, store, body.model or body.name or "")
    except OffloadError as e:
        return _error(e)
    return JSONResponse(info)


@router.post("/api/copy")
async def api_copy(body: CopyRequest, request: Request) -> Response:
    """Copy a model under a new name."""
    try:
        await run_in_threadpool(_store(request).copy, body.source, body.destination)
    except OffloadError as e:
        return _error(e)
    return Response(status_code=200)


@router.delete("/api/delete")
async def api_delete(body: ShowRequest, request: Request) -> Response:
    """Delete a model and the blobs nothing else uses."""
    try:
        await run_in_threadpool(_store(request).delete, body.model or body.name or "")
    except OffloadError as e:
        return _error(e)
    return Response(status_code=200)


@router.head("/api/blobs/{digest}")
async def api_blob_exists(digest: str, request: Request) -> Response:
    """200 when the server has the blob, 404 otherwise."""
    try:
        found = _store(request).has_blob(check_digest(digest))
    except OffloadError as e:
        return Response(status_code=e.http_status)
    return Response(status_code=200 if found else 404)


@router.post("/api/blobs/{digest}")
async def api_blob_upload(digest: str, request: Request) -> Response:
    """Store the request body as a blob, verified against ``digest``; 201 when created."""
    store = _store(request)
    try:
        digest = check_digest(digest)
        if store.has_blob(digest):
            return Response(status_code=200)
        await receive_blob(request, store, digest)
    except OffloadError as e:
        return _error(e)
    except ClientDisconnect:
        log.info("blob upload %s: the client hung up; nothing was kept", digest[:19])
        return Response(status_code=400)
    return Response(status_code=201)
