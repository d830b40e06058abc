"""The error bodies the server answers with: Ollama's ``{"error": ...}``, OpenAI's on /v1."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

__all__ = ["error_response", "one_line"]

_OPENAI_TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
                 413: "invalid_request_error", 503: "server_error"}
_MAX_MESSAGE_CHARS = 1000


def one_line(message: str) -> str:
    """``message`` on one line and of bounded length, as every error the server sends."""
    text = " ".join(str(message).split())
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


def error_response(status: int, message: str, openai: bool = False) -> JSONResponse:
    """Ollama's error shape, or OpenAI's for the /v1 routes."""
    message = one_line(message)
    if openai:
        code = "model_not_found" if status == 404 else None
        body: dict[str, Any] = {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "api_error"),
                "param": None,
                "code": code,
            }
        }
        return JSONResponse(body, status_code=status)
    return JSONResponse({"error": message}, status_code=status)
