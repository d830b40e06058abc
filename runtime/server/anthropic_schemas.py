"""Pydantic models of Anthropic's Messages API (what /openapi.json publishes for /v1/messages).

Requests ignore fields we do not use. Content blocks, tools, ``tool_choice`` and ``thinking`` are
published with their shapes but checked where they are translated (``anthropic_input``), so that
each mistake gets a message naming the block at fault.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from offload.runtime.serving.requests import Number, WholeNumber

__all__ = [
    "AnthropicError",
    "CountTokensRequest",
    "InputMessage",
    "MessageObject",
    "MessagesRequest",
    "TokenCount",
]

_IGNORE = ConfigDict(extra="ignore")
_OPEN = ConfigDict(extra="allow")
# The most tokens (and top_k) llama.cpp takes: past it a 400 names the field, not the option
# it becomes.
_INT32_MAX = 2**31 - 1


def _obj(kind: str | None, required: list[str], **props: Any) -> dict[str, Any]:
    """The JSON Schema of an object; ``kind`` is its ``type`` tag's one value."""
    if kind is not None:
        props = {"type": {"type": "string", "enum": [kind]}, **props}
    return {"type": "object", "properties": props, "required": required}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [*schema.get("anyOf", [schema]), {"type": "null"}]}


_STR, _OBJECT = {"type": "string"}, {"type": "object"}
_TEXT = _obj("text", ["type", "text"], text=_STR)
_IMAGE = _obj(
    "image",
    ["type", "source"],
    source=_obj(
        None,
        ["type"],
        type={"type": "string", "enum": ["base64", "url"]},
        media_type=_STR,
        data=_STR,
        url=_STR,
    ),
)
_TOOL_RESULT = _obj(
    "tool_result",
    ["type", "tool_use_id"],
    tool_use_id=_STR,
    is_error={"type": "boolean"},
    content={"anyOf": [_STR, {"type": "array", "items": {"anyOf": [_TEXT, _IMAGE]}}]},
)
_BLOCKS = [
    _TEXT,
    _IMAGE,
    _TOOL_RESULT,
    _obj("tool_use", ["type", "id", "name", "input"], id=_STR, name=_STR, input=_OBJECT),
    _obj("thinking", ["type", "thinking"], thinking=_STR, signature=_STR),
    _obj("redacted_thinking", ["type", "data"], data=_STR),
]
Content = Annotated[
    str | list[dict[str, Any]],
    WithJsonSchema({"anyOf": [_STR, {"type": "array", "items": {"anyOf": _BLOCKS}}]}),
]
System = Annotated[
    str | list[dict[str, Any]] | None,
    WithJsonSchema(_nullable({"anyOf": [_STR, {"type": "array", "items": _TEXT}]})),
]
Tools = Annotated[
    list[dict[str, Any]] | None,
    WithJsonSchema(
        _nullable(
            {
                "type": "array",
                "items": _obj(
                    None,
                    ["name", "input_schema"],
                    type={"type": "string", "enum": ["custom"]},
                    name=_STR,
                    description=_STR,
                    input_schema=_OBJECT,
                ),
            }
        )
    ),
]
ToolChoice = Annotated[
    dict[str, Any] | None,
    WithJsonSchema(
        _nullable(
            {
                "anyOf": [
                    _obj(None, ["type"], type={"type": "string", "enum": ["auto", "any", "none"]}),
                    _obj("tool", ["type", "name"], name=_STR),
                ]
            }
        )
    ),
]
Thinking = Annotated[
    dict[str, Any] | None,
    WithJsonSchema(
        _nullable(
            {
                "anyOf": [
                    _obj(
                        "enabled",
                        ["type", "budget_tokens"],
                        budget_tokens={"type": "integer", "minimum": 1024},
                    ),
                    _obj(None, ["type"], type={"type": "string", "enum": ["disabled", "adaptive"]}),
                ]
            }
        )
    ),
]
OutputConfig = Annotated[
    dict[str, Any] | None,
    WithJsonSchema(
        _nullable(_obj(None, [], format=_obj("json_schema", ["type", "schema"], schema=_OBJECT)))
    ),
]


class ErrorDetail(BaseModel):
    """The error's type (``invalid_request_error``, ``not_found_error`` ...) and message."""

    type: str
    message: str


class AnthropicError(BaseModel):
    """Anthropic's error body."""

    type: Literal["error"] = "error"
    error: ErrorDetail


class InputMessage(BaseModel):
    """One turn: text, or content blocks (text, image, tool_use, tool_result, thinking)."""

    model_config = _IGNORE
    role: Literal["user", "assistant"]
    content: Content


class CountTokensRequest(BaseModel):
    """POST /v1/messages/count_tokens: a Messages request without its sampling fields."""

    model_config = _IGNORE
    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: System = None
    tools: Tools = None
    tool_choice: ToolChoice = None
    thinking: Thinking = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: WholeNumber = Field(ge=1, le=_INT32_MAX)
    stop_sequences: list[str] | None = None
    temperature: Number | None = Field(default=None, ge=0)
    top_k: WholeNumber | None = Field(default=None, ge=0, le=_INT32_MAX)
    top_p: Number | None = Field(default=None, ge=0, le=1)
    stream: bool | None = False
    metadata: dict[str, Any] | None = None
    output_config: OutputConfig = None


class Usage(BaseModel):
    """Token counts: the prompt's and the answer's, as Ollama counts them."""

    model_config = _OPEN
    input_tokens: int
    output_tokens: int


class MessageObject(BaseModel):
    """The answer: content blocks (thinking, text, tool_use), why it stopped, and usage."""

    model_config = _OPEN
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(BaseModel):
    """POST /v1/messages/count_tokens' answer."""

    input_tokens: int
