"""An Anthropic Messages request, translated into the request ``service.chat`` takes.

``system`` becomes the system message. A user turn's blocks are ``text``, ``image`` and
``tool_result`` (a tool message, matched to the assistant's ``tool_use`` by id); an assistant
turn's are ``text``, ``thinking`` and ``tool_use``. ``tool_choice`` "any" or a named tool forces a
call through the grammar, as OpenAI's "required" does. Anything else is refused with a message
naming the block.
"""

from __future__ import annotations

from typing import Any

from offload.runtime.errors import BadRequest
from offload.runtime.server.anthropic_schemas import (
    CountTokensRequest,
    InputMessage,
    MessagesRequest,
)
from offload.runtime.server.bridge import forced_call_schema
from offload.runtime.server.openai_schemas import json_type, untrusted_input
from offload.runtime.serving.requests import ChatRequest

__all__ = [
    "chat_request",
    "chat_messages",
    "system_text",
    "output_format",
    "think_of",
    "tools_and_forcing",
]

_USER_BLOCKS = "text, image, tool_result"
_ASSISTANT_BLOCKS = "text, thinking, redacted_thinking, tool_use"


def _string(at: str, block: dict[str, Any], key: str) -> str:
    """``block[key]``, which must be a string (a text block's ``text``, a thinking block's ...)."""
    value = block.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"{at}.{key} must be a string, got {json_type(value)}")
    return value


def _text_blocks(where: str, blocks: Any, images: list[str] | None = None) -> str:
    """The text of a string or of text (and, where ``images`` is given, image) blocks."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise BadRequest(f"{where}: must be a string or a list of content blocks")
    texts = []
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            texts.append(_string(f"{where}[{j}]", b, "text"))
        elif kind == "image" and images is not None:
            images.append(_image(f"{where}[{j}]", b))
        else:
            expected = "text or image" if images is not None else "text"
            raise BadRequest(f"{where}[{j}]: unsupported block type {kind!r}; expected {expected}")
    return "".join(texts)


def _image(where: str, block: dict[str, Any]) -> str:
    source = block.get("source") or {}
    if (
        isinstance(source, dict)
        and source.get("type") == "base64"
        and isinstance(source.get("data"), str)
    ):
        return str(source["data"])
    if (
        isinstance(source, dict)
        and source.get("type") == "url"
        and isinstance(source.get("url"), str)
    ):
        return str(source["url"])
    raise BadRequest(f"{where}: an image needs a base64 or url source")


def system_text(system: str | list[dict[str, Any]] | None) -> str:
    """``system`` as one string (text blocks joined)."""
    if system is None:
        return ""
    return _text_blocks("system", system)


def _user_turn(where: str, blocks: list[Any], known: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    images: list[str] = []
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        at = f"{where}.content[{j}]"
        if kind == "text":
            texts.append(_string(at, b, "text"))
        elif kind == "image":
            images.append(_image(at, b))
        elif kind == "tool_result":
            tid = b.get("tool_use_id")
            if not isinstance(tid, str):
                raise BadRequest(f"{at}: tool_use_id must be a string, got {json_type(tid)}")
            if tid not in known:
                raise BadRequest(
                    f"{at}: tool_result for tool_use_id {tid!r}, which no earlier tool_use block has"
                )
            tool_images: list[str] = []
            content = _text_blocks(f"{at}.content", b.get("content") or "", tool_images)
            if b.get("is_error"):
                content = f"Error: {content}"
            msg: dict[str, Any] = {
                "role": "tool",
                "content": content,
                "tool_name": known[tid],
                "tool_call_id": tid,
            }
            if tool_images:
                msg["images"] = tool_images
            out.append(msg)
        else:
            raise BadRequest(
                f"{at}: unknown block type {kind!r} in a user turn; expected {_USER_BLOCKS}"
            )
    if texts or images or not out:
        msg = {"role": "user", "content": "".join(texts)}  # typed at its first use above
        if images:
            msg["images"] = images
        out.append(msg)
    return out


def _assistant_turn(where: str, blocks: list[Any], known: dict[str, str]) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": ""}
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        at = f"{where}.content[{j}]"
        if kind == "text":
            msg["content"] += _string(at, b, "text")
        elif kind == "thinking":
            msg["thinking"] = msg.get("thinking", "") + _string(at, b, "thinking")
        elif kind == "redacted_thinking":
            continue  # encrypted by another server: nothing a local model can read
        elif kind == "tool_use":
            tid, name, args = b.get("id"), b.get("name"), b.get("input")
            if not isinstance(tid, str) or not tid or not isinstance(name, str) or not name:
                raise BadRequest(f"{at}: a tool_use block needs an id and a name")
            if not isinstance(args, dict):
                raise BadRequest(f"{at}: a tool_use block's input must be an object")
            known[tid] = name
            msg.setdefault("tool_calls", []).append(
                {"id": tid, "function": {"name": name, "arguments": args}}
            )
        else:
            raise BadRequest(
                f"{at}: unknown block type {kind!r} in an assistant turn; expected {_ASSISTANT_BLOCKS}"
            )
    return msg


def chat_messages(system: Any, messages: list[InputMessage]) -> list[dict[str, Any]]:
    """``system`` and ``messages`` as chat messages."""
    if not messages:
        raise BadRequest("messages must hold at least one message")
    out: list[dict[str, Any]] = []
    text = system_text(system)
    if text:
        out.append({"role": "system", "content": text})
    known: dict[str, str] = {}  # tool_use id -> tool name, for the tool_results that answer them
    for i, m in enumerate(messages):
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        if m.role == "user":
            out += _user_turn(f"messages[{i}]", blocks, known)
        else:
            out.append(_assistant_turn(f"messages[{i}]", blocks, known))
    return out


def _tools(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or t.get("type", "custom") not in ("custom", None):
            kind = t.get("type") if isinstance(t, dict) else None
            raise BadRequest(
                f"tools[{i}]: tool type {kind!r} is not supported; only custom tools are"
            )
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise BadRequest(f"tools[{i}]: a tool needs a name")
        if not isinstance(t.get("input_schema"), dict):
            raise BadRequest(f"tools[{i}]: input_schema must be a JSON Schema object")
        description = t.get("description")
        if description is not None and not isinstance(description, str):
            raise BadRequest(f"tools[{i}]: description must be a string")
        fn = {
            "name": t["name"],
            "description": t.get("description") or "",
            "parameters": t["input_schema"],
        }
        tools.append({"type": "function", "function": fn})
    return tools


def tools_and_forcing(
    raw: list[dict[str, Any]] | None, choice: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(tools for ``service.chat``, a schema forcing a call or None) from ``tools``/``tool_choice``."""
    tools = _tools(raw or [])
    kind = (choice or {}).get("type", "auto")
    if kind == "auto":
        return tools, None
    if kind == "none":
        return [], None
    if kind == "any":
        return tools, forced_call_schema(tools, None)
    if kind == "tool":
        name = (choice or {}).get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest('tool_choice of type "tool" needs a name')
        return tools, forced_call_schema(tools, {name})
    raise BadRequest(f"tool_choice type {kind!r} is not supported; use auto, any, tool or none")


def think_of(thinking: dict[str, Any] | None) -> bool | None:
    """``thinking`` as ``service.chat``'s ``think``: on for "enabled"/"adaptive", off for "disabled"."""
    if thinking is None:
        return None
    kind = thinking.get("type")
    if kind in ("enabled", "adaptive"):
        return True
    if kind == "disabled":
        return False
    raise BadRequest(f"thinking type {kind!r} is not supported; use enabled, adaptive or disabled")


def output_format(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``output_config.format`` (a JSON Schema the answer follows) as ``service.chat``'s ``format``."""
    fmt = (config or {}).get("format")
    if fmt is None:
        return None
    if (
        not isinstance(fmt, dict)
        or fmt.get("type") != "json_schema"
        or not isinstance(fmt.get("schema"), dict)
    ):
        raise BadRequest('output_config.format must be {"type": "json_schema", "schema": {...}}')
    return fmt["schema"]


def chat_request(body: CountTokensRequest) -> ChatRequest:
    """The ``service.chat`` request for a Messages (or count_tokens) request; a malformed body is
    a 400 naming the field at fault (``untrusted_input``)."""
    with untrusted_input():
        return _chat_request(body)


def _chat_request(body: CountTokensRequest) -> ChatRequest:
    req: dict[str, Any] = {
        "model": body.model,
        "messages": chat_messages(body.system, body.messages),
    }
    tools, forced = tools_and_forcing(body.tools, body.tool_choice)
    if tools:
        req["tools"] = tools
        if forced is not None:
            req["format"] = forced
    think = think_of(body.thinking)
    if think is not None:
        req["think"] = think
    if isinstance(body, MessagesRequest):
        fmt = output_format(body.output_config)
        if fmt is not None:
            req["format"] = (
                fmt  # the answer's schema wins over forcing a call, as in OpenAI's faces
            )
        options = {
            "num_predict": body.max_tokens,
            "temperature": body.temperature,
            "top_k": body.top_k,
            "top_p": body.top_p,
            "stop": body.stop_sequences,
        }
        req["options"] = {k: v for k, v in options.items() if v is not None}
    return ChatRequest.model_validate(req)
