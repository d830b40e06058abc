"""The requests the service runs, typed: Ollama's generate, chat and embed requests.

Pydantic models following Ollama's published API (docs/api.md); the HTTP faces accept them as
bodies (so /openapi.json describes them), the OpenAI, Responses and Anthropic faces translate
their own requests into them, and the service takes them as they are. Unknown fields are ignored,
as Ollama does.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Tag
from pydantic_core import PydanticCustomError

__all__ = [
    "ToolCallFunction",
    "ToolCall",
    "Message",
    "GenerateRequest",
    "ChatRequest",
    "EmbedRequest",
    "EmbeddingsRequest",
    "KeepAlive",
    "Format",
    "Think",
    "WholeNumber",
    "Number",
]

_IGNORE = ConfigDict(extra="ignore")
_OPEN = ConfigDict(extra="allow")


def _not_a_boolean(value: Any) -> Any:
    """``value``, unless it is a boolean: Python's ``True`` is an int, so pydantic reads JSON's
    ``true`` as 1 for a number field (``"dimensions": true`` was one dimension)."""
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "Input should be a number, not a boolean")
    return value


# The number fields of every request body (Ollama's and the translated faces'): a boolean is a 400.
# The tag names the type in the error of a union field, as pydantic names its own types.
WholeNumber = Annotated[int, BeforeValidator(_not_a_boolean), Tag("int")]
Number = Annotated[float, BeforeValidator(_not_a_boolean), Tag("float")]

KeepAlive = str | Number | None
Format = str | dict[str, Any] | None
Think = bool | str | None


MAX_EMBED_INPUTS = 2048


class ToolCallFunction(BaseModel):
    model_config = _OPEN
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(BaseModel):
    model_config = _OPEN
    function: ToolCallFunction


class Message(BaseModel):
    """One chat message."""

    model_config = _IGNORE
    role: str
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class GenerateRequest(BaseModel):
    """POST /api/generate."""

    model_config = _IGNORE
    model: str
    prompt: str | None = None
    suffix: str | None = None
    images: list[str] | None = None
    format: Format = None
    options: dict[str, Any] | None = None
    system: str | None = None
    template: str | None = None
    context: list[WholeNumber] | None = None
    stream: bool | None = None
    raw: bool | None = None
    keep_alive: KeepAlive = None
    think: Think = None
    truncate: bool | None = None
    logprobs: bool | None = None
    top_logprobs: WholeNumber | None = None


class ChatRequest(BaseModel):
    """POST /api/chat."""

    model_config = _IGNORE
    model: str
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None
    format: Format = None
    options: dict[str, Any] | None = None
    stream: bool | None = None
    keep_alive: KeepAlive = None
    think: Think = None
    truncate: bool | None = None
    logprobs: bool | None = None
    top_logprobs: WholeNumber | None = None


class EmbedRequest(BaseModel):
    """POST /api/embed."""

    model_config = _IGNORE
    model: str
    # At most 2048 inputs, as /v1/embeddings (and OpenAI's): each is a pass through the model.
    input: str | Annotated[list[str], Field(max_length=MAX_EMBED_INPUTS)] = ""
    truncate: bool | None = True
    dimensions: WholeNumber | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class EmbeddingsRequest(BaseModel):
    """POST /api/embeddings (the older, single-prompt form)."""

    model_config = _IGNORE
    model: str
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
