"""Errors of the model library."""

from __future__ import annotations

from offload.planner.errors import OffloadError

__all__ = [
    "ModelError",
    "InvalidModelName",
    "ModelNotFound",
    "DigestMismatch",
    "StoreError",
    "RegistryError",
    "RegistryUnreachable",
    "RegistryModelNotFound",
    "AuthRequired",
    "BlobOverflow",
    "BlobNotFound",
    "InvalidQuantization",
    "DownloadInterrupted",
    "DiskFull",
]


def _human_bytes(n: int) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} bytes"


class ModelError(OffloadError):
    """Something about a model's name, files or store went wrong."""


class InvalidModelName(ModelError):
    """A name that does not parse or could escape the store."""

    http_status = 400

    def __init__(self, name: str, problem: str) -> None:
        # A newline or tab in the name is shown escaped: a one-line message would hide it.
        shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in name)
        super().__init__(f'invalid model name "{shown}": {problem}')
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


class BlobNotFound(ModelError):
    """A request names a blob (by digest) that was never uploaded to this server."""

    http_status = 400

    def __init__(self, digest: str, what: str = "blob") -> None:
        super().__init__(
            f"{what} {digest} is not on the server; upload it with POST /api/blobs first"
        )
        self.digest = digest


class InvalidQuantization(ModelError):
    """A quantization type that does not exist, or a model that cannot be quantized to it."""

    http_status = 400


class StoreError(ModelError):
    """The model store on disk could not be read or written."""


class RegistryError(ModelError):
    """A registry answered something we cannot use."""

    http_status = 502


class RegistryUnreachable(RegistryError):
    """No answer from the registry host (DNS, refused connection, timeout, TLS)."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(
            f"registry {host} is unreachable: {reason}; check the network, the host name, and "
            "--insecure for a plain-http registry"
        )
        self.host = host
        self.reason = reason


class RegistryModelNotFound(RegistryError):
    """The registry has no manifest for that name."""

    http_status = 404

    def __init__(self, name: str, host: str) -> None:
        super().__init__(f'model "{name}" not found on {host}: check the name and tag')
        self.name = name
        self.host = host


class AuthRequired(RegistryError):
    """The registry answered 401 or 403."""

    http_status = 401

    def __init__(self, name: str, host: str, status: int) -> None:
        super().__init__(
            f'model requires authentication: {host} answered {status} for "{name}"; offload pulls '
            "and pushes anonymously, so use a public model, or a registry (or namespace) you may "
            "write to without credentials"
        )
        self.name = name
        self.host = host
        self.status = status


class BlobOverflow(RegistryError):
    """A registry sent more bytes for a blob than its manifest declares; the download is dropped."""

    def __init__(self, host: str, digest: str, size: int) -> None:
        super().__init__(
            f"{host} sent more than the {size} bytes its manifest declares for {digest[:19]}; "
            "the download was discarded"
        )
        self.digest = digest


class DownloadInterrupted(RegistryError):
    """The connection broke mid-blob; the partial file is kept for resume."""

    def __init__(self, digest: str, done_bytes: int, total_bytes: int, reason: str) -> None:
        super().__init__(
            f"download of {digest[:19]} interrupted after {done_bytes} of {total_bytes} bytes "
            f"({reason}); run pull again to resume"
        )
        self.digest = digest


class DiskFull(StoreError):
    """No space left for what is being written into the store; nothing half-written is visible."""

    http_status = 507

    def __init__(
        self,
        path: str,
        done_bytes: int = 0,
        total_bytes: int = 0,
        *,
        resumable: bool = False,
        free_bytes: int | None = None,
    ) -> None:
        if free_bytes is not None:
            message = (
                f"not enough disk space for {path}: it needs {_human_bytes(total_bytes)} and "
                f"{_human_bytes(free_bytes)} are free; free some space and try again"
            )
        elif resumable:
            message = (
                f"disk full while writing {path} ({done_bytes} of {total_bytes} bytes kept for "
                "resume); free some space and pull again"
            )
        else:
            message = f"disk full while writing {path}; free some space and try again"
        super().__init__(message)
        self.path = path
