"""Pydantic models of Ollama's API, following its published docs/api.md and openapi.yaml.

Requests ignore unknown fields, as Ollama does; they exist so that /openapi.json describes the
API and tools (schemathesis, client generators) can check it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from offload.runtime.serving.requests import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    Message,
)

__all__ = [
    "ChatRequest",
    "ChatResponse",
    "EmbedRequest",
    "EmbedResponse",
    "EmbeddingsRequest",
    "EmbeddingsResponse",
    "ErrorResponse",
    "GenerateRequest",
    "GenerateResponse",
    "Message",
    "ProcessResponse",
    "ListResponse",
    "VersionResponse",
]

_IGNORE = ConfigDict(extra="ignore")
_OPEN = ConfigDict(extra="allow")

# The request models live with the service that runs them (serving/requests.py) and are published
# here beside the answers.


class ErrorResponse(BaseModel):
    """Ollama's error body."""

    error: str


class TopLogprob(BaseModel):
    """One alternative token and its log probability."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class Logprob(TopLogprob):
    """A generated token's log probability and the likeliest alternatives."""

    top_logprobs: list[TopLogprob] | None = None


class _Timings(BaseModel):
    model_config = _OPEN
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    logprobs: list[Logprob] | None = None


class GenerateResponse(_Timings):
    """One /api/generate chunk (or the whole answer when not streamed)."""

    response: str
    thinking: str | None = None
    context: list[int] | None = None


class ChatResponse(_Timings):
    """One /api/chat chunk (or the whole answer when not streamed)."""

    message: Message


class EmbedResponse(BaseModel):
    """/api/embed's answer: unit-length vectors."""

    model: str
    embeddings: list[list[float]]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


class EmbeddingsResponse(BaseModel):
    """/api/embeddings' answer."""

    embedding: list[float]


class ModelDetails(BaseModel):
    model_config = _OPEN
    parent_model: str | None = None
    format: str | None = None
    family: str | None = None
    families: list[str] | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None


class ListedModel(BaseModel):
    model_config = _OPEN
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class ListResponse(BaseModel):
    """GET /api/tags."""

    models: list[ListedModel]


class RunningModel(BaseModel):
    model_config = _OPEN
    name: str
    model: str
    size: int
    size_vram: int
    digest: str
    details: ModelDetails
    expires_at: str
    context_length: int
    plan: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None  # predicted beside measured bytes per device


class ProcessResponse(BaseModel):
    """GET /api/ps."""

    models: list[RunningModel]


class VersionResponse(BaseModel):
    """GET /api/version."""

    version: str
