"""Pydantic models of OpenAI's /v1 requests and answers (what /openapi.json publishes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "ModelList",
    "ModelObject",
    "OpenAIError",
]

_IGNORE = ConfigDict(extra="ignore")


class OpenAIError(BaseModel):
    """OpenAI's error body."""

    error: dict[str, Any]


class _Sampling(BaseModel):
    """The sampling and streaming fields both completion requests take."""

    model_config = _IGNORE
    model: str
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] = ""
    suffix: str | None = None
    logprobs: int | None = None  # legacy completions: how many alternatives per token


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings."""

    model_config = _IGNORE
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None


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
