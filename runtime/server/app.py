"""The FastAPI application: Ollama's API (and more) over the scheduler."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from offload.models.errors import ModelNotFound
from offload.models.store import Store
from offload.planner.errors import OffloadError
from offload.runtime import __version__, config
from offload.runtime.server.errors import Family, error_response, family_of
from offload.runtime.server.guard import BrowserGuard, HostPolicy, origin_regex
from offload.runtime.server.openai_schemas import json_type
from offload.runtime.server.schemas import VersionResponse
from offload.runtime.serving import planning
from offload.runtime.serving.scheduler import Scheduler

__all__ = ["create_app", "error_response", "origin_regex"]

log = logging.getLogger(__name__)


def _family(request: Request) -> Family:
    return family_of(request.url.path, request.headers)


def _leaf_routes(routes: Any) -> Iterator[Any]:
    """Every route, routers included with ``include_router`` opened up."""
    for r in routes:
        inner = getattr(r, "routes", None) or getattr(
            getattr(r, "original_router", None), "routes", None
        )
        if inner and not getattr(r, "methods", None):
            yield from _leaf_routes(inner)
        else:
            yield r


def _validation_message(exc: RequestValidationError) -> str:
    errs = exc.errors()
    for e in errs:
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return f"invalid JSON: {ctx.get('error', e.get('msg', 'malformed body'))}"
    for e in errs:
        if tuple(e.get("loc", ())) != ("body",):
            continue
        if e.get("type") == "missing":
            return "the request body is empty; send a JSON object"
        if e.get("type") == "model_attributes_type":
            return f"the request body must be a JSON object, got {json_type(e.get('input'))}"
    parts = []
    for e in errs:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


def _unparsed_body(exc: StarletteHTTPException) -> str | None:
    """What was wrong with a body FastAPI could not parse, which it calls only "There was an
    error parsing the body": bytes that are not UTF-8, or JSON nested deeper than Python goes."""
    cause = exc.__cause__
    if exc.status_code != 400:
        return None
    if isinstance(cause, UnicodeDecodeError):
        # (A body that starts like UTF-16 or UTF-32 is read as that, as JSON allows.)
        at = (
            f" (byte 0x{cause.object[cause.start]:02x} at offset {cause.start})"
            if cause.encoding.replace("-", "").lower() == "utf8"
            else ""
        )
        return f"invalid JSON: the body is not UTF-8 text{at}; send JSON encoded as UTF-8"
    if isinstance(cause, RecursionError):
        return "invalid JSON: arrays or objects are nested too deeply"
    return None


def _is_json(content_type: bytes) -> bool:
    """Whether FastAPI reads a body of this type as JSON (``application/json``, ``*/*+json``)."""
    subtype = content_type.split(b";", 1)[0].strip().lower().rpartition(b"/")[2]
    return subtype == b"json" or subtype.endswith(b"+json")


class JSONBodyByDefault:
    """Treat request bodies as JSON whatever their content type says, as Ollama does.

    ``curl URL -d '{...}'`` (the way Ollama's documentation calls the API) sends
    ``application/x-www-form-urlencoded``; our routes read JSON, so the header is set right here.
    Any other type that is not JSON's (``text/html``, ``application/octet-stream``) is read as
    JSON too: FastAPI would hand such a body to the route unparsed, and a valid JSON object was
    refused as "not a valid dictionary".
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "DELETE", "PATCH"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            old = dict(scope["headers"]).get(b"content-type", b"")
            # Blob uploads carry bytes, not JSON: leave those alone.
            if not scope.get("path", "").startswith("/api/blobs/") and not _is_json(old):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


# A JSON request body larger than this is answered 413 before it is parsed: images travel inside
# JSON (base64), so the cap is far above any prompt, yet bounds what one request can hold.
MAX_JSON_BODY = 256 << 20

# A lone UTF-16 surrogate, escaped (\\ud800) or as the bytes Python's JSON decoder lets through
# (ED A0 80): JSON text can carry one, Unicode cannot, and nothing downstream can encode it.
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(obj: Any) -> str | None:
    """The first string (or key) in ``obj`` that holds a lone surrogate, else None."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if _SURROGATE.search(x):
                return x
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return None


class CheckedJSONBody:
    """JSON bodies read once here: over ``MAX_JSON_BODY`` a 413; a string that is not valid
    Unicode (a lone surrogate) a 400 naming it. Either would otherwise reach code that cannot
    handle it (an encoder, a runner's pipe) and come back as a 500. The body is then replayed."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") not in ("POST", "PUT", "DELETE", "PATCH")
            or scope.get("path", "").startswith("/api/blobs/")
        ):
            await self.app(scope, receive, send)
            return
        encoding = dict(scope.get("headers") or []).get(b"content-encoding", b"").strip().lower()
        if encoding not in (b"", b"identity"):
            # Compressed bytes would reach the JSON parser as they are ("not UTF-8").
            await self._refuse(
                scope,
                receive,
                send,
                415,
                f"Content-Encoding {encoding.decode('latin-1')[:40]!r} is not supported; send "
                "the JSON body uncompressed",
            )
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_JSON_BODY:
                await self._refuse(
                    scope, receive, send, 413, f"request body larger than {MAX_JSON_BODY >> 20} MiB"
                )
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if _SURROGATE_HINT.search(body):
            try:
                bad = _lone_surrogate(json.loads(body))
            except (ValueError, RecursionError):
                bad = None  # not JSON: the route's own parser answers that
            if bad is not None:
                at = _SURROGATE.search(bad)
                code = f"\\u{ord(at.group()):04x}" if at else "a surrogate"
                await self._refuse(
                    scope,
                    receive,
                    send,
                    400,
                    f"invalid JSON: a string holds a lone UTF-16 surrogate ({code}), which is not "
                    "valid Unicode",
                )
                return
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Any, receive: Any, send: Any, status: int, message: str) -> None:
        request = Request(scope)
        response = error_response(status, message, family_of(request.url.path, request.headers))
        await response(scope, receive, send)


class AnswerUnexpected:
    """A bug is answered in the caller's API shape (one line; the traceback goes to the log), and
    the connection stays usable. The only last-resort handler: ``create_app`` registers none.

    Starlette's own last-resort handler sends the 500 and then raises again, so the server drops
    the connection without saying so, and a client's next request on it (keep-alive) fails too.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:  # noqa: BLE001 - the last resort: answered, then logged
            if started:
                raise  # half an answer is out: only closing the connection tells the client
            request = Request(scope)
            log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
            detail = " ".join(str(exc).split()) or type(exc).__name__  # one line
            response = error_response(
                500, f"internal error: {detail}", family_of(request.url.path, request.headers)
            )
            await response(scope, receive, send)


def create_app(store: Store | None = None, scheduler: Scheduler | None = None) -> FastAPI:
    """Build the app; ``store``/``scheduler`` default to the configured ones."""
    store = store or planning.open_store()
    scheduler = scheduler or Scheduler(store)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        store.prune_stale()  # what writers killed mid-write (kill -9, power loss) left behind
        if config.spare_runner():
            scheduler.keep_spare_runner()  # the first load skips starting a process
        try:
            yield
        finally:
            scheduler.close()  # models are freed when the server stops, not at interpreter exit

    app = FastAPI(
        title="offload",
        version=__version__,
        lifespan=lifespan,
        description="A local LLM runtime with Ollama- and OpenAI-compatible APIs.",
    )
    app.state.store = store
    app.state.scheduler = scheduler

    @app.exception_handler(OffloadError)
    async def _offload_error(request: Request, exc: OffloadError) -> JSONResponse:
        # OpenAI marks a missing model with a code; a missing route has none.
        code = "model_not_found" if isinstance(exc, ModelNotFound) else None
        return error_response(exc.http_status, str(exc), _family(request), code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A body that is not JSON at all gets the parser's own message, as Ollama gives.
        raw = await request.body()
        if raw.strip():
            try:
                json.loads(raw)
            except ValueError as e:
                return error_response(400, f"invalid JSON: {e}", _family(request))
        return error_response(400, _validation_message(exc), _family(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and methods answer in their API's error shape, not Starlette's {"detail": ...}.
        path, method = request.url.path, request.method
        if exc.status_code == 404:
            message = f"404 page not found: no route {method} {path}"
        elif exc.status_code == 405:
            # Every method of every route on this path (Starlette names the first route's only).
            methods = {
                m
                for r in _leaf_routes(request.app.router.routes)
                if getattr(r, "methods", None) and r.matches(request.scope)[0] != Match.NONE
                for m in r.methods
            }
            allowed = ", ".join(sorted(methods)) or (exc.headers or {}).get("Allow")
            exc.headers = {**(exc.headers or {}), **({"Allow": allowed} if allowed else {})}
            message = f"method {method} is not allowed on {path}" + (
                f"; use {allowed}" if allowed else ""
            )
        else:
            message = _unparsed_body(exc) or str(exc.detail)
        return error_response(exc.status_code, message, _family(request), headers=exc.headers)

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(400, f"invalid JSON: {exc}", _family(request))

    app.add_middleware(JSONBodyByDefault)
    app.add_middleware(CheckedJSONBody)
    # Added after those, so it runs before them: before bodies are read as JSON. It answers CORS
    # too, for the origins it lets in.
    app.add_middleware(
        BrowserGuard,
        hosts=HostPolicy.build(config.host().host, config.hosts()),
        origins=origin_regex(config.origins()),
    )
    app.add_middleware(AnswerUnexpected)

    @app.get("/", response_class=PlainTextResponse)
    @app.head("/", response_class=PlainTextResponse)
    async def root() -> str:
        return "Offload is running"

    @app.get("/api/version", response_model=VersionResponse)
    @app.head("/api/version", include_in_schema=False)
    async def version() -> dict[str, Any]:
        return {"version": __version__}

    from offload.runtime.server import anthropic, models_api, ollama, openai, responses

    app.include_router(ollama.router)
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(anthropic.router)
    app.include_router(models_api.router)

    return app
