"""Pydantic models of OpenAI's Responses API (what /openapi.json publishes for /v1/responses).

Requests ignore fields we do not use, as OpenAI-compatible servers do. Input items, tools, the
tool choice and the text format are published with their shapes but checked where they are
translated (``responses_input``), so that each mistake gets a message naming the item at fault.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from offload.runtime.serving.requests import Number, WholeNumber

__all__ = ["ReasoningParam", "ResponseObject", "ResponsesRequest", "TextParam", "Usage"]

_IGNORE = ConfigDict(extra="ignore")
_OPEN = ConfigDict(extra="allow")


def _obj(kind: str | None, required: list[str], **props: Any) -> dict[str, Any]:
    """The JSON Schema of an object; ``kind`` is its ``type`` tag's one value."""
    if kind is not None:
        props = {"type": {"type": "string", "enum": [kind]}, **props}
    return {"type": "object", "properties": props, "required": required}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [*schema.get("anyOf", [schema]), {"type": "null"}]}


_STR, _OBJECT = {"type": "string"}, {"type": "object"}
_PART = {
    "anyOf": [
        _obj("input_text", ["type", "text"], text=_STR),
        _obj("output_text", ["type", "text"], text=_STR),
        _obj("input_image", ["type", "image_url"], image_url=_STR),
    ]
}
_ITEMS = [
    _obj(
        None,
        ["role", "content"],
        type={"type": "string", "enum": ["message"]},
        role={"type": "string", "enum": ["user", "assistant", "system", "developer"]},
        content={"anyOf": [_STR, {"type": "array", "items": _PART}]},
    ),
    _obj(
        "function_call",
        ["type", "call_id", "name", "arguments"],
        call_id=_STR,
        name=_STR,
        arguments=_STR,
    ),
    _obj("function_call_output", ["type", "call_id", "output"], call_id=_STR, output=_STR),
    _obj(
        "reasoning",
        ["type", "summary"],
        summary={"type": "array", "items": _obj("summary_text", ["type", "text"], text=_STR)},
    ),
]
Input = Annotated[
    str | list[dict[str, Any]] | None,
    WithJsonSchema(_nullable({"anyOf": [_STR, {"type": "array", "items": {"anyOf": _ITEMS}}]})),
]
Tools = Annotated[
    list[dict[str, Any]] | None,
    WithJsonSchema(
        _nullable(
            {
                "type": "array",
                "items": _obj(
                    "function",
                    ["type", "name"],
                    name=_STR,
                    description=_STR,
                    parameters=_OBJECT,
                    strict={"type": "boolean"},
                ),
            }
        )
    ),
]
ToolChoice = Annotated[
    Literal["none", "auto", "required"] | dict[str, Any] | None,
    WithJsonSchema(
        _nullable(
            {
                "anyOf": [
                    {"type": "string", "enum": ["none", "auto", "required"]},
                    _obj("function", ["type", "name"], name=_STR),
                ]
            }
        )
    ),
]
Format = Annotated[
    dict[str, Any] | None,
    WithJsonSchema(
        _nullable(
            {
                "anyOf": [
                    _obj("text", ["type"]),
                    _obj("json_object", ["type"]),
                    _obj(
                        "json_schema",
                        ["type", "name", "schema"],
                        name=_STR,
                        schema=_OBJECT,
                        strict={"type": "boolean"},
                    ),
                ]
            }
        )
    ),
]


class ReasoningParam(BaseModel):
    """``reasoning``: how hard the model thinks; any effort but "none" turns thinking on."""

    model_config = _IGNORE
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class TextParam(BaseModel):
    """``text``: the output's format (``{"type": "text"|"json_object"|"json_schema", ...}``)."""

    model_config = _IGNORE
    format: Format = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(BaseModel):
    """POST /v1/responses."""

    model_config = _IGNORE
    model: str
    input: Input = None
    instructions: str | None = None
    max_output_tokens: WholeNumber | None = Field(default=None, ge=1, le=2**31 - 1)
    temperature: Number | None = Field(default=None, ge=0)
    top_p: Number | None = Field(default=None, ge=0, le=1)
    tools: Tools = None
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    reasoning: ReasoningParam | None = None
    previous_response_id: str | None = None
    store: bool | None = True
    stream: bool | None = False
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None


class Usage(BaseModel):
    """Token counts: the prompt's and the answer's, as Ollama counts them."""

    model_config = _OPEN
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    """A response: its output items (reasoning, message, function calls), status and usage."""

    model_config = _OPEN
    id: str
    object: Literal["response"] = "response"
    created_at: float
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[dict[str, Any]]
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool
    temperature: float | None = None
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float | None = None
    truncation: str
    usage: Usage | None = None
    metadata: dict[str, str]
