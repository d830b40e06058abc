"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) over ``service.chat``.

The request is translated by ``anthropic_input``; the answer comes back as content blocks
(``thinking``, ``text``, ``tool_use``) with Anthropic's ``stop_reason`` and ``usage``. Streamed, it
is Anthropic's named server-sent events: ``message_start``, ``ping``, per block
``content_block_start``/``_delta``/``_stop``, then ``message_delta`` and ``message_stop``. Errors
take Anthropic's shape (the app's handlers do that for these paths).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from offload.runtime.server.anthropic_input import chat_request
from offload.runtime.server.anthropic_schemas import (
    AnthropicError,
    CountTokensRequest,
    MessageObject,
    MessagesRequest,
    TokenCount,
)
from offload.runtime.server.bridge import (
    call_id,
    require_generation,
    sse,
    token_counts,
)
from offload.runtime.server.errors import anthropic_error_body
from offload.runtime.server.ollama import collect, merge_chunks
from offload.runtime.server.streaming import (
    CancellingStreamingResponse,
    ThreadedStream,
    first_chunk,
    stream_events,
)
from offload.runtime.serving import service
from offload.runtime.serving.token_count import count_chat_tokens

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["anthropic"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": AnthropicError},
    404: {"model": AnthropicError},
    503: {"model": AnthropicError},
}
_CREATED: dict[int | str, dict[str, Any]] = {
    200: {
        "model": MessageObject,
        "content": {"text/event-stream": {}},
        "description": "The message, or its server-sent events when streaming",
    },
    **_ERRORS,
}


def _stop_reason(final: dict[str, Any], has_calls: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a generation's summary chunk."""
    if has_calls:
        return "tool_use", None
    if final.get("done_reason") == "length":
        return "max_tokens", None
    if final.get("stop_sequence"):
        return "stop_sequence", final["stop_sequence"]
    return "end_turn", None


def _usage(final: dict[str, Any]) -> dict[str, int]:
    prompt, generated, cached = token_counts(final)
    # Anthropic counts the prompt tokens read from a cache apart from the input tokens.
    return {
        "input_tokens": prompt - cached,
        "output_tokens": generated,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    fn = call["function"]
    return {
        "type": "tool_use",
        "id": call_id("toolu_"),
        "name": fn["name"],
        "input": fn["arguments"],
    }


def _message(
    mid: str, model: str, content: list[dict[str, Any]], final: dict[str, Any] | None
) -> dict[str, Any]:
    """The message object; before the end (``final`` None) it has no stop reason and no output."""
    reason, seq, usage = None, None, {"input_tokens": 0, "output_tokens": 0}
    if final is not None:
        reason, seq = _stop_reason(final, any(b["type"] == "tool_use" for b in content))
        usage = _usage(final)
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": seq,
        "usage": usage,
    }


def _whole_content(final: dict[str, Any]) -> list[dict[str, Any]]:
    msg = final.get("message") or {}
    calls = msg.get("tool_calls") or []
    content: list[dict[str, Any]] = []
    if msg.get("thinking"):
        content.append({"type": "thinking", "thinking": msg["thinking"], "signature": ""})
    if msg.get("content") or not (content or calls):
        content.append({"type": "text", "text": msg.get("content") or ""})
    return content + [_tool_use(c) for c in calls]


class _Events:
    """Chunks of ``service.chat`` as Anthropic's stream events, one content block at a time."""

    def __init__(self, mid: str, model: str) -> None:
        self.mid, self.model = mid, model
        self.started = False
        self.index = -1  # the open block's index
        self.open: str | None = None  # its type: "thinking" or "text"

    def _start(self) -> list[bytes]:
        self.started = True
        message = _message(self.mid, self.model, [], None)
        return [
            sse({"type": "message_start", "message": message}, "message_start"),
            sse({"type": "ping"}, "ping"),
        ]

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [sse({"type": "content_block_stop", "index": self.index}, "content_block_stop")]

    def _block(self, block: dict[str, Any]) -> list[bytes]:
        events = self._close()
        self.index += 1
        self.open = block["type"]
        start = {"type": "content_block_start", "index": self.index, "content_block": block}
        return [*events, sse(start, "content_block_start")]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse(
            {"type": "content_block_delta", "index": self.index, "delta": delta},
            "content_block_delta",
        )

    def convert(self, chunk: dict[str, Any]) -> list[bytes]:
        """The events a chunk makes (the first chunk also starts the message)."""
        events = [] if self.started else self._start()
        msg = chunk.get("message") or {}
        if msg.get("thinking"):
            if self.open != "thinking":
                events += self._block({"type": "thinking", "thinking": "", "signature": ""})
            events.append(self._delta({"type": "thinking_delta", "thinking": msg["thinking"]}))
        if msg.get("content"):
            if self.open != "text":
                events += self._block({"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": msg["content"]}))
        if chunk.get("done"):
            calls = msg.get("tool_calls") or []
            if self.index < 0 and not calls:
                events += self._block({"type": "text", "text": ""})  # an empty answer is still text
            for call in calls:
                block = _tool_use(call)
                events += self._block({**block, "input": {}})
                events.append(
                    self._delta(
                        {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
                    )
                )
            events += self._close()
            reason, seq = _stop_reason(chunk, bool(calls))
            delta = {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": seq},
                "usage": _usage(chunk),
            }
            events += [sse(delta, "message_delta"), sse({"type": "message_stop"}, "message_stop")]
        return events

    def tail(self) -> list[bytes]:
        """Nothing more: a message always ends with its last chunk."""
        return [] if self.started else self._start()

    def error(self, message: str) -> bytes:
        """The error event that ends a stream that failed after it began."""
        return sse(anthropic_error_body(500, message), "error")


@router.post("/messages", responses=_CREATED, response_model=None)
async def create_message(body: MessagesRequest, request: Request) -> Any:
    """Create a message, streamed as Anthropic's server-sent events or whole."""
    sched = request.app.state.scheduler
    req = chat_request(body)
    await require_generation(sched, body.model)
    mid = call_id("msg_")
    ts = ThreadedStream(lambda cancel: service.chat(sched, req, cancel))
    if not body.stream:
        final = merge_chunks(await collect(ts, request), "message")
        return JSONResponse(_message(mid, body.model, _whole_content(final), final))
    first = await first_chunk(ts)
    events = _Events(mid, body.model)
    return CancellingStreamingResponse(
        stream_events(ts, first, events.convert, events.tail, events.error),
        ts,
        media_type="text/event-stream",
    )


@router.post("/messages/count_tokens", response_model=TokenCount, responses=_ERRORS)
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
    """How many tokens the request's prompt is, with the model's own template and tokenizer."""
    sched = request.app.state.scheduler
    req = chat_request(body)
    await require_generation(sched, body.model)
    return {"input_tokens": await run_in_threadpool(count_chat_tokens, sched, req)}
