"""OpenAI's Responses API (``POST /v1/responses``) over ``service.chat``.

The request is translated by ``responses_input``; the answer comes back as output items: a
``reasoning`` item (thinking), a ``message`` with ``output_text``, and a ``function_call`` per
tool call. Streamed, it is OpenAI's typed server-sent events, each with its ``sequence_number``.
A response that ran out of ``max_output_tokens`` is ``incomplete``. Responses are remembered
(``response_memory``) unless ``store`` is false, for ``previous_response_id`` and
``GET /v1/responses/{id}``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from offload.runtime.errors import BadRequest, ResponseNotFound
from offload.runtime.server.bridge import (
    call_id,
    require_generation,
    sse,
    token_counts,
)
from offload.runtime.server.ollama import collect, merge_chunks
from offload.runtime.server.openai_schemas import OpenAIError
from offload.runtime.server.response_memory import MAX_AGE_S, MAX_KEPT, ResponseMemory
from offload.runtime.server.responses_input import chat_request
from offload.runtime.server.responses_schemas import ResponseObject, ResponsesRequest
from offload.runtime.server.streaming import (
    CancellingStreamingResponse,
    ThreadedStream,
    first_chunk,
    stream_events,
)
from offload.runtime.serving import service

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["openai"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIError},
    404: {"model": OpenAIError},
    503: {"model": OpenAIError},
}
_CREATED: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ResponseObject,
        "content": {"text/event-stream": {}},
        "description": "The response, or its server-sent events when streaming",
    },
    **_ERRORS,
}


def _memory(request: Request) -> ResponseMemory:
    memory = getattr(request.app.state, "response_memory", None)
    if memory is None:
        memory = request.app.state.response_memory = ResponseMemory()
    return memory


def _status(final: dict[str, Any]) -> str:
    """A finished response's status: "incomplete" when the token limit cut it."""
    return "incomplete" if final.get("done_reason") == "length" else "completed"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning_item(iid: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": iid,
        "type": "reasoning",
        "summary": [],
        "status": status,
        "content": [{"type": "reasoning_text", "text": text}],
    }


def _message_item(iid: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_text_part(text)]
    return {"id": iid, "type": "message", "role": "assistant", "status": status, "content": content}


def _call_items(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": call_id("fc_"),
            "type": "function_call",
            "call_id": call_id(),
            "status": "completed",
            "name": c["function"]["name"],
            "arguments": json.dumps(c["function"]["arguments"]),
        }
        for c in calls
    ]


def _assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer as a chat message, for the conversation a later response continues."""
    msg: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item["type"] == "reasoning":
            msg["thinking"] = "".join(p["text"] for p in item["content"])
        elif item["type"] == "message":
            msg["content"] += "".join(p["text"] for p in item["content"])
        else:
            call = {"name": item["name"], "arguments": json.loads(item["arguments"])}
            msg.setdefault("tool_calls", []).append({"id": item["call_id"], "function": call})
    return msg


class _Answer:
    """One response's fixed fields, and how it ends: the object OpenAI's clients read."""

    def __init__(
        self, body: ResponsesRequest, conversation: list[dict[str, Any]], memory: ResponseMemory
    ) -> None:
        self.body, self.conversation, self.memory = body, conversation, memory
        self.id, self.created_at = call_id("resp_"), time.time()

    def object(
        self, status: str, output: list[dict[str, Any]], final: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The response object with ``status`` and ``output`` (usage once ``final`` has come)."""
        b = self.body
        fmt = (b.text.format if b.text else None) or {"type": "text"}
        if fmt.get("type") == "json_schema":
            fmt = {"name": "response", **fmt}
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "model": b.model,
            "output": output,
            "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id,
            "reasoning": b.reasoning.model_dump() if b.reasoning else None,
            "store": b.store is not False,
            "temperature": b.temperature,
            "text": {"format": fmt},
            "tool_choice": b.tool_choice or "auto",
            "tools": list(b.tools or []),
            "top_p": b.top_p,
            "truncation": b.truncation or "disabled",
            "usage": None,
            "metadata": b.metadata or {},
        }
        if final is not None:
            prompt, generated, cached = token_counts(final)
            obj["usage"] = {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": generated,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + generated,
            }
            if status == "incomplete":
                obj["incomplete_details"] = {"reason": "max_output_tokens"}
            else:
                obj["completed_at"] = time.time()
        return obj

    def finish(self, output: list[dict[str, Any]], final: dict[str, Any]) -> dict[str, Any]:
        """The finished response (remembered unless ``store`` is false)."""
        obj = self.object(_status(final), output, final)
        if self.body.store is not False:
            self.memory.keep(self.id, [*self.conversation, _assistant_message(output)], obj)
        return obj


def _whole_output(final: dict[str, Any]) -> list[dict[str, Any]]:
    msg = final.get("message") or {}
    output = []
    if msg.get("thinking"):
        output.append(_reasoning_item(call_id("rs_"), msg["thinking"], "completed"))
    calls = msg.get("tool_calls") or []
    if msg.get("content") or not (calls or output):  # an empty answer is still a message
        output.append(_message_item(call_id("msg_"), msg.get("content") or "", _status(final)))
    return output + _call_items(calls)


class _Events:
    """Chunks of ``service.chat`` as the Responses API's typed events.

    Thinking streams into a reasoning item, text into a message item (each opened when its first
    text comes); tool calls, parsed at the end, become function_call items; then the response.
    """

    def __init__(self, answer: _Answer) -> None:
        self.answer = answer
        self.seq = 0
        self.started = False
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item text is streaming into
        self.text = ""

    def _ev(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(data, kind)

    def _start(self) -> list[bytes]:
        self.started = True
        obj = self.answer.object("in_progress", [])
        return [
            self._ev("response.created", response=obj),
            self._ev("response.in_progress", response=obj),
        ]

    def _open_item(self, kind: str) -> list[bytes]:
        index = len(self.output)
        if kind == "reasoning":
            item, part = (
                _reasoning_item(call_id("rs_"), "", "in_progress"),
                {"type": "reasoning_text", "text": ""},
            )
            item["content"] = []
        else:
            item, part = _message_item(call_id("msg_"), None, "in_progress"), _text_part("")
        self.open, self.text = item, ""
        return [
            self._ev("response.output_item.added", output_index=index, item=item),
            self._ev(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
        ]

    def _close_item(self, status: str) -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        index, where = (
            len(self.output),
            {"item_id": item["id"], "output_index": len(self.output), "content_index": 0},
        )
        if item["type"] == "reasoning":
            done = _reasoning_item(item["id"], self.text, "completed")
            events = [
                self._ev("response.reasoning_text.done", **where, text=self.text),
                self._ev("response.content_part.done", **where, part=done["content"][0]),
            ]
        else:
            done = _message_item(item["id"], self.text, status)
            events = [
                self._ev("response.output_text.done", **where, text=self.text, logprobs=[]),
                self._ev("response.content_part.done", **where, part=_text_part(self.text)),
            ]
        self.output.append(done)
        return [*events, self._ev("response.output_item.done", output_index=index, item=done)]

    def _delta(self, kind: str, text: str) -> list[bytes]:
        events = []
        if self.open is None or self.open["type"] != kind:
            events += self._close_item("completed") + self._open_item(kind)
        assert self.open is not None
        self.text += text
        where = {"item_id": self.open["id"], "output_index": len(self.output), "content_index": 0}
        if kind == "reasoning":
            events.append(self._ev("response.reasoning_text.delta", **where, delta=text))
        else:
            events.append(self._ev("response.output_text.delta", **where, delta=text, logprobs=[]))
        return events

    def _calls(self, calls: list[dict[str, Any]]) -> list[bytes]:
        events = []
        for item in _call_items(calls):
            index = len(self.output)
            events.append(
                self._ev(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
            )
            where = {"item_id": item["id"], "output_index": index}
            events.append(
                self._ev("response.function_call_arguments.delta", **where, delta=item["arguments"])
            )
            events.append(
                self._ev(
                    "response.function_call_arguments.done", **where, arguments=item["arguments"]
                )
            )
            self.output.append(item)
            events.append(self._ev("response.output_item.done", output_index=index, item=item))
        return events

    def convert(self, chunk: dict[str, Any]) -> list[bytes]:
        """The events a chunk makes (the first chunk also opens the response)."""
        events = [] if self.started else self._start()
        msg = chunk.get("message") or {}
        if msg.get("thinking"):
            events += self._delta("reasoning", msg["thinking"])
        if msg.get("content"):
            events += self._delta("message", msg["content"])
        if chunk.get("done"):
            calls = msg.get("tool_calls") or []
            if not self.output and self.open is None and not calls:
                events += self._open_item("message")  # an empty answer is still a message
            events += self._close_item(_status(chunk)) + self._calls(calls)
            obj = self.answer.finish(self.output, chunk)
            events.append(self._ev(f"response.{obj['status']}", response=obj))
        return events

    def tail(self) -> list[bytes]:
        """Nothing more: a response always ends with its last chunk."""
        return [] if self.started else self._start()

    def error(self, message: str) -> bytes:
        """The error event that ends a stream that failed after it began."""
        return self._ev("error", code="server_error", message=message, param=None)


@router.post("/responses", responses=_CREATED, response_model=None)
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    """Create a model response, streamed as typed server-sent events or whole."""
    sched, memory = request.app.state.scheduler, _memory(request)
    history: tuple[dict[str, Any], ...] = ()
    if body.previous_response_id is not None:
        kept = memory.get(body.previous_response_id)
        if kept is None:
            raise BadRequest(
                f"previous_response_id {body.previous_response_id!r} is unknown or has expired: this "
                f"server keeps its last {MAX_KEPT} responses for {MAX_AGE_S / 60:.0f} minutes; "
                "send the whole conversation as input instead"
            )
        history = kept.messages
    req, conversation = chat_request(body, history)
    await require_generation(sched, body.model)
    answer = _Answer(body, conversation, memory)
    ts = ThreadedStream(lambda cancel: service.chat(sched, req, cancel))
    if not body.stream:
        final = merge_chunks(await collect(ts, request), "message")
        return JSONResponse(answer.finish(_whole_output(final), final))
    first = await first_chunk(ts)
    events = _Events(answer)
    return CancellingStreamingResponse(
        stream_events(ts, first, events.convert, events.tail, events.error),
        ts,
        media_type="text/event-stream",
    )


@router.get("/responses/{response_id}", response_model=ResponseObject, responses=_ERRORS)
async def get_response(response_id: str, request: Request) -> dict[str, Any]:
    """A response this server remembers, or 404."""
    kept = _memory(request).get(response_id)
    if kept is None:
        raise ResponseNotFound(
            f"response {response_id!r} is unknown or has expired (this server keeps its "
            f"last {MAX_KEPT} responses for {MAX_AGE_S / 60:.0f} minutes)"
        )
    return kept.response
