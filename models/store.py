"""The model store: content-addressed blobs and manifests in Ollama's layout.

``<root>/blobs/sha256-<hex>`` holds every layer and config; ``<root>/manifests/<host>/<namespace>/
<model>/<tag>`` names them. An Ollama store can be opened read-only beside ours, so models a user
already pulled with Ollama run without copying. Everything is written to a temporary name in the
same folder and renamed into place, so no reader ever sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from offload.models.errors import DigestMismatch, ModelNotFound, StoreError
from offload.models.names import ModelName, parse_name

__all__ = [
    "MEDIA_MANIFEST",
    "MEDIA_CONFIG",
    "MEDIA_MODEL",
    "MEDIA_TEMPLATE",
    "MEDIA_SYSTEM",
    "MEDIA_PARAMS",
    "MEDIA_LICENSE",
    "MEDIA_ADAPTER",
    "MEDIA_PROJECTOR",
    "MEDIA_MESSAGES",
    "ModelInfo",
    "ListedModel",
    "Store",
    "sha256_file",
]

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"

_CHUNK = 1 << 20
_BLOB_NAME = re.compile(r"^sha256-[0-9a-f]{64}$")


def sha256_file(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _check_digest(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
        raise StoreError(f"{digest!r} is not a sha256 digest (expected sha256:<64 hex digits>)")
    return digest


@dataclass(frozen=True)
class ModelInfo:
    """Everything needed to run a model, resolved from its manifest."""

    name: ModelName
    digest: str  # the manifest's digest: the model's id
    model_path: Path
    model_digest: str
    size_bytes: int
    template: str | None = None
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    adapters: tuple[Path, ...] = ()
    projectors: tuple[Path, ...] = ()
    messages: tuple[dict[str, Any], ...] = ()
    license: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    modified_at: datetime | None = None
    read_only: bool = False


@dataclass(frozen=True)
class ListedModel:
    """One row of ``offload list``."""

    name: ModelName
    digest: str
    size_bytes: int
    modified_at: datetime
    details: dict[str, Any]
    read_only: bool = False


class Store:
    """A model store rooted at ``root``, with optional read-only stores behind it."""

    def __init__(
        self, root: Path, read_only_roots: Iterable[Path] = (), writable: bool = True
    ) -> None:
        self.root = Path(root)
        self.writable = writable
        self.fallbacks = [Store(p, writable=False) for p in read_only_roots if Path(p) != self.root]

    # -- paths ---------------------------------------------------------------------------------

    @property
    def blobs_dir(self) -> Path:
        """Folder of blobs."""
        return self.root / "blobs"

    @property
    def manifests_dir(self) -> Path:
        """Folder of manifests."""
        return self.root / "manifests"

    def blob_path(self, digest: str) -> Path:
        """Where the blob of this digest lives (whether or not it exists)."""
        return self.blobs_dir / _check_digest(digest).replace(":", "-")

    def manifest_path(self, name: ModelName) -> Path:
        """Where this name's manifest lives."""
        return self.manifests_dir.joinpath(*name.manifest_parts())

    # -- blobs ---------------------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        """True when the blob is here, in this store or a read-only one."""
        return self.find_blob(digest) is not None

    def find_blob(self, digest: str) -> Path | None:
        """The path of a blob in this store or a fallback, or None."""
        p = self.blob_path(digest)
        if p.is_file():
            return p
        for fb in self.fallbacks:
            q = fb.find_blob(digest)
            if q is not None:
                return q
        return None

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"the store at {self.root} is read-only")

    def _tempfile(self, folder: Path) -> tuple[IO[bytes], Path]:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        return os.fdopen(fd, "wb"), Path(tmp)

    def add_blob_stream(self, chunks: Iterable[bytes], expected: str | None = None) -> str:
        """Write bytes as a blob, verifying ``expected`` if given; returns the digest."""
        self._require_writable()
        f, tmp = self._tempfile(self.blobs_dir)
        h = hashlib.sha256()
        try:
            with f:
                for chunk in chunks:
                    h.update(chunk)
                    f.write(chunk)
            digest = "sha256:" + h.hexdigest()
            if expected is not None and digest != expected:
                raise DigestMismatch(expected, digest)
            os.replace(tmp, self.blob_path(digest))
            return digest
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def add_blob_bytes(self, data: bytes) -> str:
        """Store bytes as a blob (no-op when present); returns the digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.blob_path(digest).is_file():
            self.add_blob_stream([data], expected=digest)
        return digest

    def add_blob_file(self, src: Path, expected: str | None = None) -> str:
        """Copy a file into the store as a blob; returns the digest."""
        try:
            with Path(src).open("rb") as f:
                return self.add_blob_stream(iter(lambda: f.read(_CHUNK), b""), expected)
        except FileNotFoundError:
            raise StoreError(f"{src}: no such file") from None

    # -- manifests -----------------------------------------------------------------------------

    def read_manifest_bytes(self, name: ModelName) -> bytes | None:
        """The manifest file's exact bytes in this store (not the fallbacks), or None."""
        try:
            return self.manifest_path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"manifest of {name.display} is unreadable: {e}") from None

    def locate_manifest(self, name: str | ModelName) -> tuple[Store, bytes]:
        """The store holding ``name`` and its manifest's exact bytes; raises ``ModelNotFound``."""
        n = parse_name(name) if isinstance(name, str) else name
        for store in [self, *self.fallbacks]:
            raw = store.read_manifest_bytes(n)
            if raw is not None:
                return store, raw
        raise ModelNotFound(n.display)

    def write_manifest_bytes(self, name: ModelName, raw: bytes) -> str:
        """Write manifest bytes as they are (a pulled or copied manifest keeps its digest)."""
        self._require_writable()
        manifest = json.loads(raw)
        for layer in [manifest.get("config"), *manifest.get("layers", [])]:
            if layer and not self.has_blob(layer["digest"]):
                raise StoreError(f"manifest refers to missing blob {layer['digest']}")
        p = self.manifest_path(name)
        f, tmp = self._tempfile(p.parent)
        try:
            with f:
                f.write(raw)
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    def read_manifest(self, name: ModelName) -> dict[str, Any] | None:
        """The manifest of a name in this store (not the fallbacks), or None."""
        p = self.manifest_path(name)
        try:
            return json.loads(p.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StoreError(f"manifest {p} is unreadable: {e}") from None

    def write_manifest(self, name: ModelName, manifest: dict[str, Any]) -> str:
        """Write a manifest atomically after checking its blobs are present; returns its digest."""
        self._require_writable()
        for layer in [manifest.get("config"), *manifest.get("layers", [])]:
            if layer and not self.has_blob(layer["digest"]):
                raise StoreError(f"manifest refers to missing blob {layer['digest']}")
        return self.write_manifest_bytes(name, json.dumps(manifest, separators=(",", ":")).encode())

    def new_manifest(self, layers: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
        """Build a manifest for layers, writing the config blob."""
        cfg = json.dumps(config, separators=(",", ":")).encode()
        digest = self.add_blob_bytes(cfg)
        return {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": digest, "size": len(cfg)},
            "layers": layers,
        }

    def layer_for_bytes(self, media_type: str, data: bytes) -> dict[str, Any]:
        """Store ``data`` and return its manifest layer entry."""
        return {"mediaType": media_type, "digest": self.add_blob_bytes(data), "size": len(data)}

    def names(self) -> Iterator[ModelName]:
        """Every model name with a manifest in this store (not the fallbacks)."""
        base = self.manifests_dir
        if not base.is_dir():
            return
        for p in sorted(base.glob("*/*/*/*")):
            if p.is_file() and not p.name.startswith(".tmp-"):
                host, ns, model, tag = p.relative_to(base).parts
                try:
                    yield parse_name(f"{host}/{ns}/{model}:{tag}")
                except Exception:  # noqa: BLE001 - a stray file is not a model; skip it
                    continue

    # -- models --------------------------------------------------------------------------------

    def _locate(self, name: ModelName) -> tuple[Store, dict[str, Any]] | None:
        m = self.read_manifest(name)
        if m is not None:
            return self, m
        for fb in self.fallbacks:
            found = fb._locate(name)
            if found:
                return found
        return None

    def exists(self, name: str | ModelName) -> bool:
        """True when a manifest for this name is in any store."""
        n = parse_name(name) if isinstance(name, str) else name
        return self._locate(n) is not None

    def _read_text(self, digest: str) -> str:
        p = self.find_blob(digest)
        if p is None:
            raise StoreError(f"blob {digest} is missing from the store; pull the model again")
        return p.read_text(encoding="utf-8")

    def resolve(self, name: str | ModelName) -> ModelInfo:
        """Everything needed to run ``name``; raises ``ModelNotFound``."""
        n = parse_name(name) if isinstance(name, str) else name
        found = self._locate(n)
        if found is None:
            raise ModelNotFound(name if isinstance(name, str) else n.display)
        store, manifest = found
        mpath = store.manifest_path(n)
        raw = store.read_manifest_bytes(n) or b""
        model_path = model_digest = None
        size = 0
        text: dict[str, str] = {}
        params: dict[str, Any] = {}
        adapters, projectors, licenses, messages = [], [], [], []
        for layer in manifest.get("layers", []):
            mt, digest = layer.get("mediaType"), layer.get("digest")
            size += int(layer.get("size", 0))
            if mt == MEDIA_MODEL:
                model_path, model_digest = self.find_blob(digest), digest
                if model_path is None:
                    raise StoreError(
                        f"model blob {digest} of {n.display} is missing; pull it again"
                    )
            elif mt in (MEDIA_TEMPLATE, MEDIA_SYSTEM):
                text[mt] = self._read_text(digest)
            elif mt == MEDIA_PARAMS:
                params = json.loads(self._read_text(digest))
            elif mt == MEDIA_LICENSE:
                licenses.append(self._read_text(digest))
            elif mt == MEDIA_MESSAGES:
                messages.extend(json.loads(self._read_text(digest)))
            elif mt in (MEDIA_ADAPTER, MEDIA_PROJECTOR):
                p = self.find_blob(digest)
                if p is None:
                    raise StoreError(f"blob {digest} of {n.display} is missing; pull it again")
                (adapters if mt == MEDIA_ADAPTER else projectors).append(p)
        if model_path is None:
            raise StoreError(f"{n.display} has no model layer")
        config: dict[str, Any] = {}
        cfg = manifest.get("config") or {}
        if cfg.get("digest") and self.find_blob(cfg["digest"]):
            try:
                config = json.loads(self._read_text(cfg["digest"]))
            except ValueError:
                config = {}
        return ModelInfo(
            name=n,
            digest="sha256:" + hashlib.sha256(raw).hexdigest(),
            model_path=model_path,
            model_digest=model_digest or "",
            size_bytes=size,
            template=text.get(MEDIA_TEMPLATE),
            system=text.get(MEDIA_SYSTEM),
            params=params,
            adapters=tuple(adapters),
            projectors=tuple(projectors),
            messages=tuple(messages),
            license=tuple(licenses),
            config=config,
            manifest=manifest,
            modified_at=datetime.fromtimestamp(mpath.stat().st_mtime, UTC)
            if mpath.exists()
            else None,
            read_only=not store.writable,
        )

    def list(self) -> list[ListedModel]:
        """Every model in this store and the read-only ones (ours first when names clash)."""
        seen: dict[ModelName, ListedModel] = {}
        for store in [self, *self.fallbacks]:
            for n in store.names():
                if n in seen:
                    continue
                p = store.manifest_path(n)
                try:
                    raw = p.read_bytes()
                    m = json.loads(raw)
                except (OSError, ValueError):
                    continue
                cfg: dict[str, Any] = {}
                cdig = (m.get("config") or {}).get("digest")
                if cdig and store.find_blob(cdig):
                    try:
                        cfg = json.loads(store.find_blob(cdig).read_bytes())  # type: ignore[union-attr]
                    except ValueError:
                        cfg = {}
                seen[n] = ListedModel(
                    name=n,
                    digest="sha256:" + hashlib.sha256(raw).hexdigest(),
                    size_bytes=sum(int(layer.get("size", 0)) for layer in m.get("layers", [])),
                    modified_at=datetime.fromtimestamp(p.stat().st_mtime, UTC),
                    details=cfg,
                    read_only=not store.writable,
                )
        return sorted(seen.values(), key=lambda m: m.modified_at, reverse=True)

    def delete(self, name: str | ModelName) -> None:
        """Remove a name; blobs no other manifest uses are removed too."""
        self._require_writable()
        n = parse_name(name) if isinstance(name, str) else name
        p = self.manifest_path(n)
        if not p.is_file():
            for fb in self.fallbacks:
                if fb.manifest_path(n).is_file():
                    raise StoreError(
                        f"{n.display} is in the read-only store at {fb.root}; remove it with the "
                        "tool that owns that store (ollama rm)"
                    )
            raise ModelNotFound(n.display)
        p.unlink()
        for d in [p.parent, p.parent.parent, p.parent.parent.parent]:
            try:
                d.rmdir()
            except OSError:
                break
        self.prune()

    def prune(self) -> list[str]:
        """Delete blobs no manifest refers to; returns their digests."""
        used: set[str] = set()
        for n in self.names():
            m = self.read_manifest(n) or {}
            for layer in [m.get("config"), *m.get("layers", [])]:
                if layer:
                    used.add(layer["digest"])
        removed = []
        if self.blobs_dir.is_dir():
            for b in self.blobs_dir.iterdir():
                # Only whole blobs: "-partial" files and their state are resumable downloads.
                if _BLOB_NAME.match(b.name) and b.name.replace("-", ":", 1) not in used:
                    b.unlink(missing_ok=True)
                    removed.append(b.name.replace("-", ":", 1))
        return removed

    def copy(self, src: str | ModelName, dst: str | ModelName) -> None:
        """Give a model a second name (the blobs are shared)."""
        s = parse_name(src) if isinstance(src, str) else src
        d = parse_name(dst) if isinstance(dst, str) else dst
        store, raw = self.locate_manifest(s)
        manifest = json.loads(raw)
        if store is not self:
            for layer in [manifest.get("config"), *manifest.get("layers", [])]:
                if layer and not self.blob_path(layer["digest"]).is_file():
                    self.blob_path(layer["digest"]).parent.mkdir(parents=True, exist_ok=True)
                    self.add_blob_file(store.blob_path(layer["digest"]), expected=layer["digest"])
        self.write_manifest_bytes(d, raw)

    @staticmethod
    def now() -> datetime:
        """Current UTC time (for callers that stamp things)."""
        return datetime.now(UTC)
