"""Errors of the runtime: loading, generating, serving."""

from __future__ import annotations

from offload.planner.errors import OffloadError

__all__ = [
    "RuntimeFailure",
    "LoadFailed",
    "OutOfMemory",
    "PlanNotApplicable",
    "BadRequest",
    "ServerUnavailable",
    "QueueFull",
    "ContextTooLong",
    "PayloadTooLarge",
    "ResponseNotFound",
    "ClientGone",
]


class RuntimeFailure(OffloadError):
    """Something went wrong running a model."""


class LoadFailed(RuntimeFailure):
    """llama.cpp could not load the model with this plan."""

    http_status = 500


class BadRequest(RuntimeFailure):
    """A request the runtime cannot honour as asked."""

    http_status = 400


class ContextTooLong(BadRequest):
    """The prompt does not fit the context and truncation was refused."""


class ResponseNotFound(RuntimeFailure):
    """A stored response that this server does not hold (never kept, or forgotten)."""

    http_status = 404


class ClientGone(RuntimeFailure):
    """The client hung up before its answer was ready, so the work for it was stopped (nginx's
    499: nobody reads the answer)."""

    http_status = 499


class QueueFull(RuntimeFailure):
    """Too many requests are waiting (``OFFLOAD_MAX_QUEUE``)."""

    http_status = 503


class ServerUnavailable(RuntimeFailure):
    """No server answers and one could not be started."""


class OutOfMemory(LoadFailed):
    """llama.cpp ran out of memory loading the model or its context; a smaller plan may fit."""

    http_status = 507


class PlanNotApplicable(LoadFailed):
    """The plan cannot be applied to this model or machine (checked before loading)."""

    http_status = 400


class PayloadTooLarge(BadRequest):
    """A request part larger than the server accepts (a list of token ids, a template)."""

    http_status = 413
