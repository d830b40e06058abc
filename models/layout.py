"""Small shared pieces of the store's format: media types, digest checks, atomic writes.

Paths inside a store are ``Store.blob_path`` / ``Store.manifest_path``; a digest is checked here
before it becomes a file name, so none can point outside the store.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from offload.models.errors import ModelError

__all__ = [
    "MEDIA_CONFIG",
    "MEDIA_MANIFEST",
    "MEDIA_PREFIX",
    "InvalidDigest",
    "atomic_write",
    "check_digest",
]

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_PREFIX = "application/vnd.ollama.image."

_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


class InvalidDigest(ModelError):
    """A digest that is not ``sha256:<64 hex>``."""

    http_status = 400

    def __init__(self, digest: str) -> None:
        super().__init__(f'invalid digest "{digest}", expected sha256:<64 hex digits>')
        self.digest = digest


def check_digest(digest: str) -> str:
    """Return ``digest`` in ``sha256:<hex>`` form; raise ``InvalidDigest`` otherwise."""
    m = _DIGEST.match(digest or "")
    if not m:
        raise InvalidDigest(str(digest))
    return f"sha256:{m.group(1)}"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
