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
from offload.runtime.server.ollama import collect, merge_chunks, until_hangup
from offload.runtime.server.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelList,
    ModelObject,
    OpenAIError,
    json_type,
    untrusted_input,
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


def _content_text(where: str, content: Any, images: list[str]) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise BadRequest(
            f"{where}.content must be a string or an array of content parts, got {json_type(content)}"
        )
    parts = []
    for j, p in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            text = p.get("text", "")
            if not isinstance(text, str):
                raise BadRequest(f"{at}.text must be a string, got {json_type(text)}")
            parts.append(text)
        elif kind == "image_url":
            image = p.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str):
                raise BadRequest(
                    f'{at}.image_url must be an object with a string "url", got {json_type(image)}'
                )
            images.append(url)
        else:
            raise BadRequest(f"{at}: unsupported content part: {p!r}")
    return "".join(parts)


def _arguments(where: str, raw: Any) -> dict[str, Any]:
    """A tool call's ``arguments``: a string holding a JSON object (or the object itself)."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise BadRequest(f"{where} must be a string holding a JSON object, got {json_type(raw)}")
    try:
        args = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"{where} must be a JSON object: it is nested too deeply") from None
    except ValueError:
        raise BadRequest(f"{where} must be a JSON object, got invalid JSON") from None
    if not isinstance(args, dict):
        raise BadRequest(f"{where} must be a JSON object, got {json_type(args)}")
    return args


def _tool_call(where: str, c: Any) -> dict[str, Any]:
    if not isinstance(c, dict):
        raise BadRequest(f"{where} must be an object, got {json_type(c)}")
    fn = c.get("function")
    if not isinstance(fn, dict):
        raise BadRequest(
            f"{where}.function must be an object with a name and arguments, got {json_type(fn)}"
        )
    name = fn.get("name", "")
    if not isinstance(name, str):
        raise BadRequest(f"{where}.function.name must be a string, got {json_type(name)}")
    args = _arguments(f"{where}.function.arguments", fn.get("arguments"))
    return {"function": {"name": name, "arguments": args}}


def _messages(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        role = m.get("role", "user")
        if not isinstance(role, str):
            raise BadRequest(f"{where}.role must be a string, got {json_type(role)}")
        images: list[str] = []
        msg: dict[str, Any] = {
            "role": role,
            "content": _content_text(where, m.get("content"), images),
        }
        if images:
            msg["images"] = images
        raw_calls = m.get("tool_calls")
        if raw_calls is not None and not isinstance(raw_calls, list):
            raise BadRequest(
                f"{where}.tool_calls must be an array of tool calls, got {json_type(raw_calls)}"
            )
        if raw_calls:
            msg["tool_calls"] = [
                _tool_call(f"{where}.tool_calls[{k}]", c) for k, c in enumerate(raw_calls)
            ]
        name = m.get("name")
        if role == "tool" and name:
            if not isinstance(name, str):
                raise BadRequest(f"{where}.name must be a string, got {json_type(name)}")
            msg["tool_name"] = name
        out.append(msg)
    return out


def _format(rf: dict[str, Any] | None) -> Any:
    if not rf or rf.get("type") == "text":
        return None
    if rf.get("type") == "json_object":
        return "json"
    if rf.get("type") == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON Schema object")
        return schema
    raise BadRequest(f"unsupported response_format type {rf.get('type')!r}")


def _check_tools(tools: list[dict[str, Any]]) -> None:
    """Function tools, each with a named ``function`` (what the template and grammar read)."""
    for i, t in enumerate(tools):
        kind = t.get("type", "function")
        if kind != "function":
            raise BadRequest(
                f"tools[{i}]: tool type {kind!r} is not supported; only function tools are"
            )
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise BadRequest(
                f"tools[{i}].function must be an object with a name, got {json_type(fn)}"
            )
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"tools[{i}].function.name must be a non-empty string")
        for field, ok in (("description", str), ("parameters", dict)):
            value = fn.get(field)
            if value is not None and not isinstance(value, ok):
                raise BadRequest(
                    f"tools[{i}].function.{field} must be "
                    f"{'a string' if ok is str else 'a JSON Schema object'}, got {json_type(value)}"
                )


def _choice_name(choice: Any) -> str | None:
    """The function ``tool_choice`` names, or None ("none", "auto", "required" or absent)."""
    if choice is None or choice in ("none", "auto", "required"):
        return None
    if not isinstance(choice, dict):
        raise BadRequest(
            'tool_choice must be "none", "auto", "required" or '
            f'{{"type": "function", "function": {{"name": ...}}}}, got {choice!r}'
        )
    fn = choice.get("function")
    if fn is None and choice.get("type") not in (None, "function"):
        return None  # another kind of choice (allowed_tools ...): the tools are offered, not forced
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise BadRequest(
            'tool_choice must name a function as {"type": "function", "function": {"name": ...}}'
        )
    return name


def _forced_call_schema(tools: list[dict[str, Any]], choice: Any) -> dict[str, Any] | None:
    """The schema that makes the model call a tool ("required" or a named function), else None."""
    if choice == "required":
        return forced_call_schema(tools, None)
    name = _choice_name(choice)
    return None if name is None else forced_call_schema(tools, {name})


def _chat_request(body: ChatCompletionRequest) -> ChatRequest:
    """The ``service.chat`` request for ``body``; a malformed body is a 400 naming the field."""
    with untrusted_input():
        req: dict[str, Any] = {
            "model": body.model,
            "messages": _messages(body.messages),
            "options": _options(body, body.max_completion_tokens or body.max_tokens),
            "format": _format(body.response_format),
            "logprobs": bool(body.logprobs),
            "top_logprobs": body.top_logprobs or 0,
        }
        _choice_name(body.tool_choice)  # refused whether or not tools come with it
        if body.tools:
            _check_tools(body.tools)
        if body.tools and body.tool_choice != "none":
            req["tools"] = body.tools
            forced = _forced_call_schema(body.tools, body.tool_choice)
            if forced is not None and req["format"] is None:
                req["format"] = forced
        if body.reasoning_effort:
            req["think"] = body.reasoning_effort
        return ChatRequest.model_validate(req)


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
    chat = _chat_request(body)
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
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
    with untrusted_input():
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
    # The route's pattern ends in "$", which matches before a final newline: the parameter would
    # lose one, so the name is read from the path itself.
    model = str(request.scope["path"]).split("/models/", 1)[1]
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
    out = await until_hangup(
        request,
        lambda cancel: embeddings.embed(
            sched, body.model, inputs, True, body.dimensions, cancel=cancel
        ),
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
