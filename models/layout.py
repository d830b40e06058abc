"""The store's format, in one place: media types, digests, size caps, manifest shapes, safe writes.

Paths inside a store are ``Store.blob_path`` / ``Store.manifest_path``; a digest is checked here
before it becomes a file name, so none can point outside the store. Manifests and configs come
from registries and from other programs' stores, so they are untrusted: each is read under a size
cap and its shape is checked before any field is used.

Every file is written to a ``.tmp-`` name in its folder and renamed into place, so no reader ever
sees half a file. The writer holds an advisory lock on its temporary file for as long as it
writes: a process killed midway (kill -9, power loss) leaves a file that nobody locks, and
``prune_stale`` removes it the next time a store is opened by the server.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout

from offload.models.errors import DigestMismatch, DiskFull, ModelError, StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: stale files are then removed by age alone
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MEDIA_MANIFEST",
    "MEDIA_CONFIG",
    "MEDIA_PREFIX",
    "MEDIA_MODEL",
    "MEDIA_TEMPLATE",
    "MEDIA_SYSTEM",
    "MEDIA_PARAMS",
    "MEDIA_LICENSE",
    "MEDIA_ADAPTER",
    "MEDIA_PROJECTOR",
    "MEDIA_MESSAGES",
    "GGUF_MEDIA",
    "TEXT_MEDIA",
    "MAX_MANIFEST_BYTES",
    "MAX_CONFIG_BYTES",
    "MAX_TEXT_BYTES",
    "MAX_LAYERS",
    "MAX_BLOB_BYTES",
    "BLOB_NAME",
    "TEMP_PREFIX",
    "BlobWriter",
    "InvalidDigest",
    "InvalidManifest",
    "atomic_write",
    "check_digest",
    "check_manifest",
    "config_details",
    "layer_cap_bytes",
    "no_space",
    "open_temp",
    "prune_stale",
    "read_capped",
    "sha256_file",
]

log = logging.getLogger(__name__)

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_PREFIX = "application/vnd.ollama.image."
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"
#: Layers that are GGUF files (checked with the header reader before they are used).
GGUF_MEDIA = frozenset({MEDIA_MODEL, MEDIA_ADAPTER, MEDIA_PROJECTOR})
#: Layers read whole into memory when a model is resolved.
TEXT_MEDIA = frozenset({MEDIA_TEMPLATE, MEDIA_SYSTEM, MEDIA_PARAMS, MEDIA_LICENSE, MEDIA_MESSAGES})

#: Caps on what a manifest may make us read. Ollama's manifests are ~1 KB with a handful of
#: layers, configs ~500 bytes, templates and licenses tens of KB; the largest GGUF blobs are a few
#: hundred GB. Docker's registry caps manifests at 4 MiB too.
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 1 << 20
MAX_TEXT_BYTES = 8 << 20
MAX_LAYERS = 256
MAX_BLOB_BYTES = 4 << 40

BLOB_NAME = re.compile(r"^sha256-[0-9a-f]{64}$")
TEMP_PREFIX = ".tmp-"
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+\-/]{0,127}$")
_CHUNK = 1 << 20
# Out of room, whether the disk, a quota or a file-size limit says so.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: A temporary file nobody locks is left alone this long after its last write: the writer may
#: have created it a moment ago and not have locked it yet.
TEMP_GRACE_S = 60.0
#: A resumable download nobody has touched for this long is given up.
PARTIAL_MAX_AGE_S = 7 * 24 * 3600.0


class InvalidDigest(ModelError):
    """A digest that is not ``sha256:<64 hex>``."""

    http_status = 400

    def __init__(self, digest: str) -> None:
        super().__init__(f'invalid digest "{str(digest)[:100]}", expected sha256:<64 hex digits>')
        self.digest = digest


class InvalidManifest(ModelError):
    """A manifest or config whose size or shape offload cannot use."""

    http_status = 400

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def check_digest(digest: str) -> str:
    """Return ``digest`` in ``sha256:<hex>`` form; raise ``InvalidDigest`` otherwise."""
    m = _DIGEST.match(digest if isinstance(digest, str) else "")
    if not m:
        raise InvalidDigest(str(digest))
    return f"sha256:{m.group(1)}"


def sha256_file(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(4 * _CHUNK):
            h.update(block)
    return "sha256:" + h.hexdigest()


def layer_cap_bytes(media_type: str) -> int:
    """The most bytes a layer of this media type may declare."""
    if media_type == MEDIA_CONFIG:
        return MAX_CONFIG_BYTES
    if media_type in TEXT_MEDIA:
        return MAX_TEXT_BYTES
    return MAX_BLOB_BYTES


def _check_layer(layer: Any, where: str, config: bool = False) -> dict[str, Any]:
    if not isinstance(layer, dict):
        raise InvalidManifest(f"{where} is {type(layer).__name__}, expected an object")
    media, size = layer.get("mediaType"), layer.get("size")
    if not isinstance(media, str) or not _MEDIA_TYPE.match(media):
        raise InvalidManifest(f"{where} has media type {repr(media)[:60]}")
    if not config and not media.startswith(MEDIA_PREFIX):
        raise InvalidManifest(f"{where} has media type {media!r}, not an Ollama layer")
    try:
        check_digest(layer.get("digest"))  # type: ignore[arg-type]
    except InvalidDigest as e:
        raise InvalidManifest(f"{where}: {e}") from None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidManifest(f"{where} has size {repr(size)[:40]}, expected a byte count")
    cap = MAX_CONFIG_BYTES if config else layer_cap_bytes(media)
    if size > cap:
        raise InvalidManifest(f"{where} declares {size} bytes, more than the {cap} allowed")
    return layer


def check_manifest(raw: bytes) -> dict[str, Any]:
    """Parse manifest bytes and check their shape; raise ``InvalidManifest`` naming the problem."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InvalidManifest(f"manifest of {len(raw)} bytes, more than the {MAX_MANIFEST_BYTES}")
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidManifest(f"manifest is not JSON ({str(e)[:80]})") from None
    if not isinstance(manifest, dict):
        raise InvalidManifest(f"manifest is {type(manifest).__name__}, expected an object")
    _check_layer(manifest.get("config"), "manifest config", config=True)
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise InvalidManifest("manifest has no layers")
    if len(layers) > MAX_LAYERS:
        raise InvalidManifest(f"manifest has {len(layers)} layers, more than {MAX_LAYERS}")
    for i, layer in enumerate(layers):
        _check_layer(layer, f"manifest layer {i}")
    if not any(layer["mediaType"] == MEDIA_MODEL for layer in layers):
        raise InvalidManifest("manifest has no model layer")
    return manifest


# The config fields listings show, each a short string (a registry's config may hold anything).
_CONFIG_TEXT = ("model_format", "model_family", "model_type", "file_type")
_CONFIG_TEXT_CHARS = 256
_CONFIG_MAX_FAMILIES = 16


def config_details(raw: bytes | None) -> dict[str, Any]:
    """The usable part of a config blob: short strings under the keys listings show, else empty."""
    if raw is None:
        return {}
    try:
        cfg = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    out: dict[str, Any] = {}
    for key in _CONFIG_TEXT:
        v = cfg.get(key)
        if isinstance(v, str) and len(v) <= _CONFIG_TEXT_CHARS:
            out[key] = v
    fams = cfg.get("model_families")
    if isinstance(fams, list):
        kept = [f for f in fams[:_CONFIG_MAX_FAMILIES] if isinstance(f, str)]
        out["model_families"] = [f for f in kept if len(f) <= _CONFIG_TEXT_CHARS]
    rootfs = cfg.get("rootfs")
    if isinstance(rootfs, dict):
        out["rootfs"] = rootfs
    return out


class BlobWriter:
    """Bytes on their way into the store: hashed as written, committed under their digest."""

    def __init__(self, blobs_dir: Path, expected: str | None = None) -> None:
        self.blobs_dir = blobs_dir
        self.expected = check_digest(expected) if expected is not None else None
        self._file: IO[bytes] | None
        self._file, self.tmp = open_temp(blobs_dir)
        self._hash = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> None:
        """Append bytes; ``DiskFull`` when the disk is."""
        assert self._file is not None, "write after close"
        with no_space(self.tmp):
            self._file.write(data)
        self._hash.update(data)
        self.bytes += len(data)

    def commit(self) -> str:
        """Check the digest and move the blob into place; returns its digest."""
        assert self._file is not None, "commit after close"
        try:
            with no_space(self.tmp):
                self._file.close()
            self._file = None
            digest = "sha256:" + self._hash.hexdigest()
            if self.expected is not None and digest != self.expected:
                raise DigestMismatch(self.expected, digest)
            os.replace(self.tmp, self.blobs_dir / digest.replace(":", "-"))
            return digest
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop what was written (safe to call more than once)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        self.tmp.unlink(missing_ok=True)


def read_capped(path: Path, cap: int, what: str) -> bytes:
    """A small file's bytes, refused (``StoreError``) when it is larger than ``cap``."""
    with Path(path).open("rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise StoreError(f"{what} is larger than {cap} bytes; it cannot be a valid one")
    return data


@contextmanager
def no_space(path: Path | str, *, done_bytes: int = 0, total_bytes: int = 0) -> Iterator[None]:
    """Turn 'no space left' (disk, quota or file-size limit) into ``DiskFull`` while writing."""
    try:
        yield
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise DiskFull(str(path), done_bytes, total_bytes) from e
        raise


def _lock(f: IO[bytes]) -> None:
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def open_temp(folder: Path) -> tuple[IO[bytes], Path]:
    """A new ``.tmp-`` file in ``folder``, open for writing and locked until it is closed."""
    with no_space(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX)
    f = os.fdopen(fd, "wb")
    _lock(f)
    return f, Path(tmp)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    f, tmp = open_temp(path.parent)
    try:
        with no_space(path), f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _unlocked(path: Path) -> bool:
    """True when no live process holds the writer's lock on this file."""
    if fcntl is None:
        return True
    try:
        with path.open("rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except OSError:
        return False


def _idle_s(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def prune_stale(
    root: Path, *, grace_s: float = TEMP_GRACE_S, partial_age_s: float = PARTIAL_MAX_AGE_S
) -> list[Path]:
    """Remove what dead writers left in a store: unlocked temporary files, abandoned downloads."""
    removed: list[Path] = []
    now = time.time()
    candidates: list[Path] = []
    for folder in (root / "blobs", root / ".tmp"):
        if folder.is_dir():
            candidates += [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)]
    manifests = root / "manifests"
    if manifests.is_dir():
        candidates += [p for p in manifests.rglob(TEMP_PREFIX + "*") if p.is_file()]
    for p in candidates:
        if _idle_s(p, now) >= grace_s and _unlocked(p):
            p.unlink(missing_ok=True)
            removed.append(p)
    blobs = root / "blobs"
    if blobs.is_dir():
        for p in blobs.glob("sha256-*-partial"):
            if _idle_s(p, now) < partial_age_s:
                continue
            # A pull holds this lock for as long as it downloads the blob.
            lock = FileLock(str(root / ".locks" / (p.name.removesuffix("-partial") + ".lock")))
            try:
                with lock.acquire(timeout=0):
                    p.unlink(missing_ok=True)
                    p.with_name(p.name + ".json").unlink(missing_ok=True)
                    removed.append(p)
            except (Timeout, OSError):
                continue
    if removed:
        log.info("removed %d stale temporary files from %s", len(removed), root)
    return removed
