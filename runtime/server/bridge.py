"""What the chat-shaped faces over ``service.chat`` share: OpenAI's chat completions and Responses,
and Anthropic's Messages.

Each face parses its request into the dict ``service.chat`` takes and formats its chunks back; the
pieces they have in common live here: the JSON Schema that forces a tool call through the
grammar, token counts, call ids, server-sent-event framing, and the loop that streams a
generation's events with errors reported in the stream once its headers are sent.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi.concurrency import run_in_threadpool

from offload.models.capabilities import capabilities_of
from offload.runtime.errors import BadRequest

__all__ = [
    "call_id",
    "forced_call_schema",
    "require_generation",
    "sse",
    "token_counts",
]

log = logging.getLogger(__name__)


def forced_call_schema(tools: Sequence[dict[str, Any]], names: set[str] | None) -> dict[str, Any]:
    """A JSON Schema whose documents are calls of one of ``tools`` (only ``names``, when given).

    Tools are in ``service.chat``'s shape (``{"type": "function", "function": {...}}``). Used as the
    request's ``format``, the model's answer is a call by construction, which the tool-call parser
    reads back: how ``tool_choice`` "required"/"any"/a named tool is honoured by a small model.
    """
    alts = []
    for t in tools:
        fn = t.get("function") or {}
        if not fn.get("name") or (names is not None and fn["name"] not in names):
            continue
        params = fn.get("parameters") or {"type": "object"}
        alts.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
            }
        )
    if not alts:
        wanted = ", ".join(sorted(names or ())) or "a tool"
        raise BadRequest(f"tool_choice asks for {wanted}, which is not among the request's tools")
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


async def require_generation(sched: Any, model: str) -> None:
    """Refuse, before anything loads, a model that cannot generate (an embedding model)."""
    info = await run_in_threadpool(sched.resolve, model)
    if "completion" not in await run_in_threadpool(capabilities_of, info):
        raise BadRequest(
            f'"{model}" is an embedding model and cannot generate text; use it for embeddings'
        )


def token_counts(final: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt tokens, generated tokens, prompt tokens read from the cache) of a generation's
    summary chunk. The prompt count is the whole prompt, the cached part included, as OpenAI
    counts it; Ollama's ``prompt_eval_count`` is the part evaluated."""
    cached = int(final.get("prompt_cached_count") or 0)
    return (
        int(final.get("prompt_eval_count") or 0) + cached,
        int(final.get("eval_count") or 0),
        cached,
    )


def call_id(prefix: str = "call_") -> str:
    """A fresh id for a tool call (or any output item), ``prefix`` then 24 hex digits."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: an ``event:`` line when named, and the JSON ``data:`` line."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()
