"""Errors in the shape of the API a request speaks: Ollama's, OpenAI's or Anthropic's.

A path belongs to one family: ``/api/...`` and the rest to Ollama (``{"error": "..."}``),
``/v1/messages...`` (and any ``/v1/`` request an Anthropic client sends, which it marks with an
``anthropic-version`` header) to Anthropic (``{"type": "error", "error": {"type", "message"}}``),
the other ``/v1/`` paths to OpenAI (``{"error": {"message", "type", "param", "code"}}``). Every
error a route raises, and every unknown path or method, answers in its family's shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from fastapi.responses import JSONResponse

__all__ = [
    "Family",
    "one_line",
    "anthropic_error_body",
    "error_body",
    "error_response",
    "family_of",
    "openai_error_body",
]

Family = Literal["ollama", "openai", "anthropic"]

_ANTHROPIC_PATHS = ("/v1/messages", "/v1/complete")

_OPENAI_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    405: "invalid_request_error",
    415: "invalid_request_error",
    503: "server_error",
}
# Anthropic's error types by status (its API reference, "Errors").
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def family_of(path: str, headers: Mapping[str, str] | None = None) -> Family:
    """Which API a request path (and, for ``/v1/``, its headers) belongs to."""
    if path in _ANTHROPIC_PATHS or path.startswith(tuple(p + "/" for p in _ANTHROPIC_PATHS)):
        return "anthropic"
    if path.startswith("/v1/") or path == "/v1":
        if headers is not None and "anthropic-version" in headers:
            return "anthropic"
        return "openai"
    return "ollama"


def openai_error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; ``code`` is set only where OpenAI sets one (``model_not_found``)."""
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "api_error"),
            "param": None,
            "code": code,
        }
    }


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error object, its ``type`` chosen by status as Anthropic does."""
    default = "api_error" if status >= 500 else "invalid_request_error"
    return {
        "type": "error",
        "error": {"type": _ANTHROPIC_TYPES.get(status, default), "message": message},
    }


_MAX_MESSAGE_CHARS = 1000


def one_line(message: str) -> str:
    """``message`` on one line and of bounded length, as every error the server sends."""
    text = " ".join(str(message).split())
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


def error_body(
    family: Family, status: int, message: str, code: str | None = None
) -> dict[str, Any]:
    """The body of an error in ``family``'s shape (its message on one line)."""
    message = one_line(message)
    if family == "anthropic":
        return anthropic_error_body(status, message)
    if family == "openai":
        return openai_error_body(status, message, code)
    return {"error": message}


def error_response(
    status: int,
    message: str,
    family: Family = "ollama",
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error answer in ``family``'s shape with ``status`` (and headers such as ``Allow``)."""
    return JSONResponse(
        error_body(family, status, message, code), status_code=status, headers=dict(headers or {})
    )
