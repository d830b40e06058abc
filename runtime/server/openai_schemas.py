"""Pydantic models of OpenAI's /v1 requests and answers (what /openapi.json publishes)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "ModelList",
    "ModelObject",
    "OpenAIError",
]

_IGNORE = ConfigDict(extra="ignore")

# OpenAI's documented ranges; a value outside one is a 400 naming the field and the bound.
_INT32_MAX = 2**31 - 1
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
TokenCount = Annotated[int, Field(ge=1, le=_INT32_MAX)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
# At most 2048 inputs per request, as OpenAI's embeddings endpoint.
_MAX_INPUTS = 2048


class OpenAIError(BaseModel):
    """OpenAI's error body."""

    error: dict[str, Any]


class _Sampling(BaseModel):
    """The sampling and streaming fields both completion requests take."""

    model_config = _IGNORE
    model: str
    temperature: Temperature | None = None
    top_p: Probability | None = None
    max_tokens: TokenCount | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[dict[str, Any]]
    max_completion_tokens: TokenCount | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] = ""
    suffix: str | None = None
    # Legacy completions: how many alternatives per token.
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings."""

    model_config = _IGNORE
    model: str
    input: (
        str
        | Annotated[list[str], Field(max_length=_MAX_INPUTS)]
        | list[int]
        | Annotated[list[list[int]], Field(max_length=_MAX_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None


class ModelObject(BaseModel):
    """One model in /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelObject]
