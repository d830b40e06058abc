"""A Responses API request, translated into the request ``service.chat`` takes.

``input`` is a string (one user message) or a list of items: messages (``role`` with text, or
parts ``input_text``/``output_text``/``input_image``), ``function_call`` (the model's earlier call),
``function_call_output`` (its result, matched to the call by ``call_id``) and ``reasoning``
(earlier thinking, given to the next assistant message). Anything else is refused with a message
that names the item.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from offload.runtime.errors import BadRequest
from offload.runtime.server.bridge import forced_call_schema
from offload.runtime.server.openai_schemas import json_type, untrusted_input
from offload.runtime.server.responses_schemas import ResponsesRequest
from offload.runtime.serving.requests import ChatRequest

__all__ = ["calls_by_id", "chat_request", "input_messages", "text_format", "tools_and_forcing"]

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_ITEM_TYPES = "message, function_call, function_call_output, reasoning"


def _text_of_parts(where: str, parts: Any, images: list[str]) -> str:
    if parts is None or isinstance(parts, str):
        return parts or ""
    if not isinstance(parts, list):
        raise BadRequest(f"{where}: content must be a string or a list of content parts")
    texts = []
    for j, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(p.get("text"), str):
            texts.append(p["text"])
        elif kind == "refusal" and isinstance(p.get("refusal"), str):
            texts.append(p["refusal"])
        elif kind == "input_image":
            url = p.get("image_url") or p.get("file_id")
            if not isinstance(url, str) or not url:
                raise BadRequest(f"{where}.content[{j}]: input_image needs an image_url")
            images.append(url.split(",", 1)[1] if url.startswith("data:") else url)
        else:
            raise BadRequest(
                f"{where}.content[{j}]: unsupported content part type {kind!r}; "
                "expected input_text, output_text or input_image"
            )
    return "".join(texts)


def calls_by_id(messages: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Tool-call id to function name, over the calls in ``messages``."""
    return {
        c["id"]: (c.get("function") or {}).get("name", "")
        for m in messages
        for c in m.get("tool_calls") or []
        if isinstance(c, dict) and c.get("id")
    }


def _arguments(where: str, raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if not isinstance(raw, str):
        raise BadRequest(
            f"{where}: arguments must be a string holding a JSON object, got {json_type(raw)}"
        )
    try:
        args = json.loads(raw)
    except RecursionError:
        raise BadRequest(
            f"{where}: arguments must be a JSON object; it is nested too deeply"
        ) from None
    except ValueError:
        raise BadRequest(f"{where}: arguments must be a JSON object, got {raw!r}") from None
    if not isinstance(args, dict):
        raise BadRequest(f"{where}: arguments must be a JSON object, got {raw!r}")
    return args


def input_messages(
    items: str | list[dict[str, Any]] | None, history: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """``input`` as chat messages; ``history`` (a previous response's) resolves earlier call ids."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    known = calls_by_id(history)
    thinking = ""  # a reasoning item's text, for the assistant message that follows it
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where}: an input item must be an object")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            raw_role = item.get("role")
            role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
            if role is None:
                raise BadRequest(
                    f"{where}: role must be user, assistant, system or developer, got {raw_role!r}"
                )
            images: list[str] = []
            msg: dict[str, Any] = {
                "role": role,
                "content": _text_of_parts(where, item.get("content"), images),
            }
            if images:
                msg["images"] = images
            if role == "assistant" and thinking:
                msg["thinking"], thinking = thinking, ""
            out.append(msg)
        elif kind == "function_call":
            name, cid = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not name or not isinstance(cid, str) or not cid:
                raise BadRequest(f"{where}: a function_call needs a name and a call_id")
            call = {
                "id": cid,
                "function": {"name": name, "arguments": _arguments(where, item.get("arguments"))},
            }
            known[cid] = name
            # A turn's text and its calls come as separate items: they are one assistant message.
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            if thinking:
                out[-1]["thinking"], thinking = thinking, ""
        elif kind == "function_call_output":
            cid = item.get("call_id")
            if not isinstance(cid, str):
                raise BadRequest(f"{where}: call_id must be a string, got {json_type(cid)}")
            if cid not in known:
                raise BadRequest(
                    f"{where}: function_call_output for call_id {cid!r}, which no function_call "
                    "in the conversation made"
                )
            images = []
            output = item.get("output")
            content = output if isinstance(output, str) else _text_of_parts(where, output, images)
            msg = {"role": "tool", "content": content, "tool_name": known[cid], "tool_call_id": cid}
            if images:
                msg["images"] = images
            out.append(msg)
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            if not isinstance(parts, list):
                raise BadRequest(f"{where}: reasoning content must be a list")
            thinking += "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))
        else:
            raise BadRequest(
                f"{where}: unknown input item type {kind!r}; expected one of {_ITEM_TYPES}"
            )
    return out


def _tools(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise BadRequest(
                f"tools[{i}]: tool type {kind!r} is not supported; only function tools are"
            )
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise BadRequest(f"tools[{i}]: a function tool needs a name")
        params = t.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadRequest(f"tools[{i}]: parameters must be a JSON Schema object")
        description = t.get("description")
        if description is not None and not isinstance(description, str):
            raise BadRequest(f"tools[{i}]: description must be a string")
        fn = {
            "name": t["name"],
            "description": t.get("description") or "",
            "parameters": params or {"type": "object", "properties": {}},
        }
        tools.append({"type": "function", "function": fn})
    return tools


def tools_and_forcing(
    raw: list[dict[str, Any]] | None, choice: Any
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(tools for ``service.chat``, a schema forcing a call or None) from ``tools``/``tool_choice``."""
    tools = _tools(raw or [])
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return [], None
    if choice == "required":
        return tools, forced_call_schema(tools, None)
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("tool_choice: a function choice needs a name")
        return tools, forced_call_schema(tools, {name})
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        listed = choice.get("tools")
        if not isinstance(listed, list):
            raise BadRequest(
                f"tool_choice.tools: allowed_tools needs an array of tools, got {json_type(listed)}"
            )
        names = {
            a["name"] for a in listed if isinstance(a, dict) and isinstance(a.get("name"), str)
        }
        allowed = [t for t in tools if t["function"]["name"] in names]
        if not allowed:
            raise BadRequest("tool_choice: allowed_tools names none of the request's tools")
        forced = forced_call_schema(allowed, None) if choice.get("mode") == "required" else None
        return allowed, forced
    raise BadRequest(
        f"tool_choice {choice!r} is not supported; use auto, none, required or a function"
    )


def text_format(text: Any) -> Any:
    """``text.format`` as ``service.chat``'s ``format``: None, "json" or a JSON Schema."""
    fmt = getattr(text, "format", None)
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return "json"
    if fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("text.format.schema must be a JSON Schema object")
        return schema
    raise BadRequest(
        f"text.format type {fmt.get('type')!r} is not supported; use text, json_object or json_schema"
    )


def chat_request(
    body: ResponsesRequest, history: Sequence[dict[str, Any]]
) -> tuple[ChatRequest, list[dict[str, Any]]]:
    """The ``service.chat`` request for ``body`` continuing ``history`` (a previous response's),
    and the conversation to remember: history and input, without this request's instructions.
    A malformed body is a 400 naming the field at fault (``untrusted_input``)."""
    with untrusted_input():
        return _chat_request(body, history)


def _chat_request(
    body: ResponsesRequest, history: Sequence[dict[str, Any]]
) -> tuple[ChatRequest, list[dict[str, Any]]]:
    conversation = list(history) + input_messages(body.input, history)
    if not any(m["role"] != "system" for m in conversation):
        raise BadRequest(
            "input is empty: send a string or a list of items (or a previous_response_id)"
        )
    messages = conversation
    if body.instructions:
        messages = [{"role": "system", "content": body.instructions}, *conversation]
    options = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "num_predict": body.max_output_tokens,
    }
    req: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "options": {k: v for k, v in options.items() if v is not None},
        "format": text_format(body.text),
    }
    tools, forced = tools_and_forcing(body.tools, body.tool_choice)
    if tools:
        req["tools"] = tools
        if forced is not None and req["format"] is None:
            req["format"] = forced
    if body.reasoning is not None:
        req["think"] = body.reasoning.effort != "none"
    return ChatRequest.model_validate(req), conversation
