"""Pydantic models of OpenAI's /v1 requests and answers (what /openapi.json publishes).

Also what every translator (OpenAI's, the Responses API's, Anthropic's) uses to refuse a
malformed request body: ``untrusted_input`` turns what translating it raised into a one-line 400.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Tag, ValidationError

from offload.planner.errors import OffloadError
from offload.runtime.errors import BadRequest
from offload.runtime.serving.requests import Number, WholeNumber

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "ModelList",
    "ModelObject",
    "OpenAIError",
    "json_type",
    "untrusted_input",
    "validation_message",
]

_IGNORE = ConfigDict(extra="ignore")

# OpenAI's documented ranges; a value outside one is a 400 naming the field and the bound.
_INT32_MAX = 2**31 - 1
Temperature = Annotated[Number, Field(ge=0, le=2, allow_inf_nan=False)]
Probability = Annotated[Number, Field(ge=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[Number, Field(ge=-2, le=2, allow_inf_nan=False)]
TokenCount = Annotated[WholeNumber, Field(ge=1, le=_INT32_MAX)]
Seed = Annotated[WholeNumber, Field(ge=-(2**63), le=2**64 - 1)]
# At most 2048 inputs per request, as OpenAI's embeddings endpoint.
_MAX_INPUTS = 2048


def json_type(value: Any) -> str:
    """The JSON type of ``value``, for messages that say what a field got instead."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


_MAX_REPORTED = 3  # errors named in one message; more are counted


def validation_message(exc: ValidationError) -> str:
    """A pydantic error as one short line: each field's path and what is wrong with it."""
    errs = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for e in errs[:_MAX_REPORTED]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        msg = " ".join(str(e.get("msg", "invalid")).split())
        parts.append(f"{loc}: {msg}" if loc else msg)
    if len(errs) > _MAX_REPORTED:
        parts.append(f"and {len(errs) - _MAX_REPORTED} more")
    return "; ".join(parts) or "invalid value"


@contextlib.contextmanager
def untrusted_input(what: str = "request") -> Iterator[None]:
    """Translate a client's request body inside this: what a wrong type there raises is a 400.

    The translators check the fields they read and name the one at fault; this is the net under
    them. A ``TypeError`` (an unhashable id), ``AttributeError`` (``.get`` on a string),
    ``KeyError``, ``ValueError``, ``RecursionError`` (JSON nested too deep) or pydantic's
    ``ValidationError`` (building the internal request) becomes ``BadRequest`` with one line, never
    a 500 with a traceback's or pydantic's multi-line text.
    """
    try:
        yield
    except OffloadError:
        raise
    except ValidationError as e:
        raise BadRequest(f"invalid {what}: {validation_message(e)}") from None
    except RecursionError:
        raise BadRequest(f"invalid {what}: a value is nested too deeply") from None
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise BadRequest(f"invalid {what}: {detail}") from None


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
    n: Annotated[WholeNumber, Field(ge=1, le=128)] | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[dict[str, Any]]
    max_completion_tokens: TokenCount | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[WholeNumber, Field(ge=0, le=20)] | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] = ""
    suffix: str | None = None
    # Legacy completions: how many alternatives per token.
    logprobs: Annotated[WholeNumber, Field(ge=0, le=20)] | None = None


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings."""

    model_config = _IGNORE
    model: str
    input: (
        str
        | Annotated[list[str], Field(max_length=_MAX_INPUTS)]
        | Annotated[list[WholeNumber], Tag("list[int]")]
        | Annotated[list[list[WholeNumber]], Field(max_length=_MAX_INPUTS), Tag("list[list[int]]")]
    )
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Annotated[WholeNumber, Field(ge=1)] | None = None


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
