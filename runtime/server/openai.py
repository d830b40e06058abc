"""OpenAI's /v1 API over the same generation functions as Ollama's.

Requests are translated to Ollama's shape (options, format, tools), run through
``service.chat``/``service.generate``, and the chunks translated back: SSE ``data:`` lines ending
with ``data: [DONE]`` when streaming. Errors take OpenAI's shape (the app's handlers do that for
every ``/v1/`` path).
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from offload.models.errors import ModelNotFound
from offload.runtime.errors import BadRequest
from offload.runtime.server.bridge import (
    call_id,
    forced_call_schema,
    sse,
    token_counts,
)
from offload.runtime.server.errors import openai_error_body
from offload.runtime.server.ollama import collect, merge_chunks
from offload.runtime.server.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelList,
    ModelObject,
    OpenAIError,
)
from offload.runtime.server.streaming import (
    CancellingStreamingResponse,
    ThreadedStream,
    first_chunk,
    stream_events,
)
from offload.runtime.serving import embeddings, planning, service, validate
from offload.runtime.serving.requests import ChatRequest, GenerateRequest

__all__ = ["router"]

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIError},
    404: {"model": OpenAIError},
    503: {"model": OpenAIError},
}


def _options(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
) -> dict[str, Any]:
    if body.n not in (None, 1):
        raise BadRequest("n must be 1")
    opts: dict[str, Any] = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "num_predict": max_tokens,
        "seed": body.seed,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
    }
    return {k: v for k, v in opts.items() if v is not None}


def _content_text(content: Any, images: list[str]) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for p in content:
        if isinstance(p, dict) and p.get("type") == "text":
            parts.append(p.get("text", ""))
        elif isinstance(p, dict) and p.get("type") == "image_url":
            images.append(str((p.get("image_url") or {}).get("url", "")))
        else:
            raise BadRequest(f"unsupported content part: {p!r}")
    return "".join(parts)


def _messages(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in msgs:
        images: list[str] = []
        msg: dict[str, Any] = {
            "role": m.get("role", "user"),
            "content": _content_text(m.get("content"), images),
        }
        if images:
            msg["images"] = images
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = c.get("function") or {}
                args = fn.get("arguments") or "{}"
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    raise BadRequest("tool_calls arguments must be a JSON object") from None
                calls.append({"function": {"name": fn.get("name", ""), "arguments": args}})
            msg["tool_calls"] = calls
        if m.get("role") == "tool" and m.get("name"):
            msg["tool_name"] = m["name"]
        out.append(msg)
    return out


def _format(rf: dict[str, Any] | None) -> Any:
    if not rf or rf.get("type") == "text":
        return None
    if rf.get("type") == "json_object":
        return "json"
    if rf.get("type") == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON Schema object")
        return schema
    raise BadRequest(f"unsupported response_format type {rf.get('type')!r}")


def _forced_call_schema(tools: list[dict[str, Any]], choice: Any) -> dict[str, Any] | None:
    """The schema that makes the model call a tool ("required" or a named function), else None."""
    if choice == "required":
        return forced_call_schema(tools, None)
    if isinstance(choice, dict) and (choice.get("function") or {}).get("name"):
        return forced_call_schema(tools, {choice["function"]["name"]})
    return None


def _finish(done_reason: str | None, has_calls: bool) -> str:
    if has_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def _usage(final: dict[str, Any]) -> dict[str, Any]:
    p, c, cached = token_counts(final)
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _tool_calls(calls: list[dict[str, Any]], streaming: bool) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(calls):
        item: dict[str, Any] = {
            "id": call_id(),
            "type": "function",
            "function": {
                "name": c["function"]["name"],
                "arguments": json.dumps(c["function"]["arguments"]),
            },
        }
        if streaming:
            item["index"] = i
        out.append(item)
    return out


def _sse_stream(
    ts: ThreadedStream, first: dict[str, Any] | None, convert: Any, tail: Any
) -> AsyncIterator[bytes]:
    """``data:`` lines of each converted chunk, the tail, then ``data: [DONE]``."""
    return stream_events(
        ts,
        first,
        lambda c: [sse(obj) for obj in convert(c)],
        lambda: [*(sse(obj) for obj in tail()), b"data: [DONE]\n\n"],
        lambda message: sse(openai_error_body(500, message)),
    )


@router.post("/chat/completions", responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    """Chat completions, streamed as SSE or whole."""
    sched = request.app.state.scheduler
    req: dict[str, Any] = {
        "model": body.model,
        "messages": _messages(body.messages),
        "options": _options(body, body.max_completion_tokens or body.max_tokens),
        "format": _format(body.response_format),
        "logprobs": bool(body.logprobs),
        "top_logprobs": body.top_logprobs or 0,
    }
    if body.tools and body.tool_choice != "none":
        req["tools"] = body.tools
        forced = _forced_call_schema(body.tools, body.tool_choice)
        if forced is not None and req["format"] is None:
            req["format"] = forced
    if body.reasoning_effort:
        req["think"] = body.reasoning_effort
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    chat = ChatRequest.model_validate(req)
    ts = ThreadedStream(lambda cancel: service.chat(sched, chat, cancel))
    if not body.stream:
        final = merge_chunks(await collect(ts, request), "message")
        msg = final.get("message") or {}
        calls = msg.get("tool_calls") or []
        out_msg: dict[str, Any] = {"role": "assistant", "content": msg.get("content", "")}
        if msg.get("thinking"):
            out_msg["reasoning"] = msg["thinking"]
        if calls:
            out_msg["tool_calls"] = _tool_calls(calls, streaming=False)
        choice = {
            "index": 0,
            "message": out_msg,
            "logprobs": {"content": final["logprobs"]} if final.get("logprobs") else None,
            "finish_reason": _finish(final.get("done_reason"), bool(calls)),
        }
        return JSONResponse(
            {
                **_envelope(cid, "chat.completion", created, body.model, [choice]),
                "usage": _usage(final),
            }
        )
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    last: dict[str, Any] = {}

    def base(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return _envelope(cid, "chat.completion.chunk", created, body.model, choices)

    def convert(c: dict[str, Any]) -> list[dict[str, Any]]:
        msg = c.get("message") or {}
        delta: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
        if msg.get("thinking"):
            delta["reasoning"] = msg["thinking"]
        calls = msg.get("tool_calls") or []
        if calls:
            delta["tool_calls"] = _tool_calls(calls, streaming=True)
        finish = _finish(c.get("done_reason"), bool(calls)) if c.get("done") else None
        if c.get("done"):
            last.update(c)
            if not delta["content"] and not calls and "reasoning" not in delta:
                delta = {}
        lps = {"content": c["logprobs"]} if c.get("logprobs") else None
        return [base([{"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish}])]

    def tail() -> list[dict[str, Any]]:
        return [{**base([]), "usage": _usage(last)}] if include_usage else []

    first = await first_chunk(ts)
    return CancellingStreamingResponse(
        _sse_stream(ts, first, convert, tail), ts, media_type="text/event-stream"
    )


@router.post("/completions", responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Any:
    """Text completions, streamed as SSE or whole."""
    sched = request.app.state.scheduler
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) > 1:
            raise BadRequest("only one prompt per request is supported")
        prompt = prompt[0] if prompt else ""
    req: dict[str, Any] = {
        "model": body.model,
        "prompt": prompt,
        "options": _options(body, body.max_tokens),
        "logprobs": body.logprobs is not None,
        "top_logprobs": body.logprobs or 0,
    }
    if body.suffix:
        req["suffix"] = body.suffix
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    gen = GenerateRequest.model_validate(req)
    ts = ThreadedStream(lambda cancel: service.generate(sched, gen, cancel))

    def choice(
        text: str, finish: str | None, lps: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        return {
            "text": text,
            "index": 0,
            "logprobs": _legacy_logprobs(lps),
            "finish_reason": finish,
        }

    if not body.stream:
        final = merge_chunks(await collect(ts, request), "response")
        whole = choice(
            final.get("response", ""),
            _finish(final.get("done_reason"), False),
            final.get("logprobs"),
        )
        return JSONResponse(
            {
                **_envelope(cid, "text_completion", created, body.model, [whole]),
                "usage": _usage(final),
            }
        )
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    last: dict[str, Any] = {}

    def base(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return _envelope(cid, "text_completion", created, body.model, choices)

    def convert(c: dict[str, Any]) -> list[dict[str, Any]]:
        if c.get("done"):
            last.update(c)
        finish = _finish(c.get("done_reason"), False) if c.get("done") else None
        return [base([choice(c.get("response") or "", finish, c.get("logprobs"))])]

    def tail() -> list[dict[str, Any]]:
        return [{**base([]), "usage": _usage(last)}] if include_usage else []

    first = await first_chunk(ts)
    return CancellingStreamingResponse(
        _sse_stream(ts, first, convert, tail), ts, media_type="text/event-stream"
    )


def _envelope(
    cid: str, obj: str, created: int, model: str, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    """The fields every completion object and chunk share."""
    return {
        "id": cid,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": "fp_offload",
        "choices": choices,
    }


def _legacy_logprobs(lps: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The completions API's older logprobs shape: parallel lists and a dict per position."""
    if not lps:
        return None
    offsets, pos = [], 0
    for t in lps:
        offsets.append(pos)
        pos += len(t["token"])
    return {
        "tokens": [t["token"] for t in lps],
        "token_logprobs": [t["logprob"] for t in lps],
        "top_logprobs": [
            {a["token"]: a["logprob"] for a in t.get("top_logprobs") or []} for t in lps
        ],
        "text_offset": offsets,
    }


def _model_object(m: Any) -> dict[str, Any]:
    return {
        "id": m.name.display,
        "object": "model",
        "created": int(m.modified_at.timestamp()),
        "owned_by": m.name.namespace if getattr(m.name, "namespace", "") else "library",
    }


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> dict[str, Any]:
    """The models in the store."""
    listed = await run_in_threadpool(planning.list_models, request.app.state.store)
    return {"object": "list", "data": [_model_object(m) for m in listed]}


@router.get("/models/{model:path}", response_model=ModelObject, responses=_ERRORS)
async def get_model(model: str, request: Request) -> dict[str, Any]:
    """One model, or 404."""
    store = request.app.state.store
    listed = await run_in_threadpool(planning.list_models, store)
    info = store.resolve(model)  # ModelNotFound -> 404; a bad name -> 400
    for m in listed:
        if m.name.display == info.name.display:
            return _model_object(m)
    raise ModelNotFound(f"model {model!r} not found")


def _b64(vec: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


@router.post("/embeddings", responses=_ERRORS)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    """Embeddings (unit length), as floats or base64 float32."""
    sched = request.app.state.scheduler
    raw: Any = body.input
    inputs: list[Any]
    if isinstance(raw, str):
        inputs = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        inputs = [list(raw)]
    elif raw and all(isinstance(x, list) for x in raw):
        inputs = [list(x) for x in raw]
    else:
        inputs = [str(x) for x in raw]
    if not inputs or any(not s for s in inputs):
        raise BadRequest("input must not be empty")
    if any(isinstance(x, list) for x in inputs):
        # Token ids are checked against the model's vocabulary before they go near it.
        info = await run_in_threadpool(sched.resolve, body.model)
        inputs = [
            validate.token_ids_for(info, x, "input") if isinstance(x, list) else x for x in inputs
        ]
    out = await run_in_threadpool(
        embeddings.embed, sched, body.model, inputs, True, body.dimensions
    )
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _b64(v) if body.encoding_format == "base64" else v,
        }
        for i, v in enumerate(out.embeddings)
    ]
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": out.prompt_eval_count, "total_tokens": out.prompt_eval_count},
    }
