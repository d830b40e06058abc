"""Errors of the model library."""

from __future__ import annotations

from offload.planner.errors import OffloadError

__all__ = [
    "ModelError",
    "InvalidModelName",
    "ModelNotFound",
    "DigestMismatch",
    "StoreError",
]


class ModelError(OffloadError):
    """Something about a model's name, files or store went wrong."""


class InvalidModelName(ModelError):
    """A name that does not parse or could escape the store."""

    http_status = 400

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f'invalid model name "{name}": {problem}')
        self.name = name
        self.problem = problem


class ModelNotFound(ModelError):
    """No model of that name in any store."""

    http_status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f'model "{name}" not found, try "offload pull {name}"')
        self.name = name


class DigestMismatch(ModelError):
    """Bytes whose sha256 is not the digest they were promised under."""

    http_status = 400

    def __init__(self, expected: str, actual: str, what: str = "blob") -> None:
        super().__init__(
            f"{what} digest mismatch: expected {expected}, got {actual}; the download was discarded, "
            "try again"
        )
        self.expected = expected
        self.actual = actual


class StoreError(ModelError):
    """The model store on disk could not be read or written."""
