"""The model store: content-addressed blobs and manifests in Ollama's layout.

``<root>/blobs/sha256-<hex>`` holds every layer and config; ``<root>/manifests/<host>/<namespace>/
<model>/<tag>`` names them. An Ollama store can be opened read-only beside ours, so models a user
already pulled with Ollama run without copying. Everything is written to a temporary name in the
same folder and renamed into place, so no reader ever sees half a file.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from offload.models.errors import ModelError, ModelNotFound, StoreError
from offload.models.layout import (
    BLOB_NAME,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_TEXT_BYTES,
    MEDIA_ADAPTER,
    MEDIA_CONFIG,
    MEDIA_LICENSE,
    MEDIA_MANIFEST,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_PROJECTOR,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    TEMP_PREFIX,
    BlobWriter,
    InvalidManifest,
    atomic_write,
    check_digest,
    check_manifest,
    config_details,
    prune_stale,
    read_capped,
    sha256_file,
)
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
    "BlobWriter",
    "ModelInfo",
    "ListedModel",
    "Store",
    "sha256_file",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


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
        return self.blobs_dir / check_digest(digest).replace(":", "-")

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

    def prune_stale(self) -> list[Path]:
        """Remove temporary files of writers that died and downloads abandoned long ago."""
        return prune_stale(self.root) if self.writable else []

    def blob_writer(self, expected: str | None = None) -> BlobWriter:
        """A writer for a new blob (the caller writes, then commits or aborts)."""
        self._require_writable()
        return BlobWriter(self.blobs_dir, expected)

    def add_blob_stream(self, chunks: Iterable[bytes], expected: str | None = None) -> str:
        """Write bytes as a blob, verifying ``expected`` if given; returns the digest."""
        w = self.blob_writer(expected)
        try:
            for chunk in chunks:
                w.write(chunk)
        except BaseException:
            w.abort()
            raise
        return w.commit()

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
            return read_capped(
                self.manifest_path(name), MAX_MANIFEST_BYTES, f"the manifest of {name.display}"
            )
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"manifest of {name.display} is unreadable: {e.strerror}") from None

    def locate_manifest(self, name: str | ModelName) -> tuple[Store, bytes]:
        """The store holding ``name`` and its manifest's exact bytes; raises ``ModelNotFound``."""
        n = parse_name(name) if isinstance(name, str) else name
        for store in [self, *self.fallbacks]:
            raw = store.read_manifest_bytes(n)
            if raw is not None:
                return store, raw
        raise ModelNotFound(n.display)

    def _check_blobs(self, manifest: dict[str, Any]) -> None:
        for layer in [manifest["config"], *manifest["layers"]]:
            if not self.has_blob(layer["digest"]):
                raise StoreError(f"manifest refers to missing blob {layer['digest']}")

    def write_manifest_bytes(self, name: ModelName, raw: bytes) -> str:
        """Write manifest bytes as they are (a pulled or copied manifest keeps its digest)."""
        self._require_writable()
        try:
            manifest = check_manifest(raw)
        except InvalidManifest as e:
            raise StoreError(f"cannot write the manifest of {name.display}: {e.problem}") from None
        self._check_blobs(manifest)
        atomic_write(self.manifest_path(name), raw)
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    def _parse(self, name: ModelName, raw: bytes) -> dict[str, Any]:
        try:
            return check_manifest(raw)
        except InvalidManifest as e:
            raise StoreError(
                f"the manifest of {name.display} in {self.root} is unusable ({e.problem}); "
                f"remove the model and pull or create it again"
            ) from None

    def read_manifest(self, name: ModelName) -> dict[str, Any] | None:
        """The checked manifest of a name in this store (not the fallbacks), or None."""
        raw = self.read_manifest_bytes(name)
        return None if raw is None else self._parse(name, raw)

    def write_manifest(self, name: ModelName, manifest: dict[str, Any]) -> str:
        """Write a manifest atomically after checking its blobs are present; returns its digest."""
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

    def _manifest_files(self) -> Iterator[Path]:
        base = self.manifests_dir
        if not base.is_dir():
            return
        for p in sorted(base.glob("*/*/*/*")):
            if p.is_file() and not p.name.startswith(TEMP_PREFIX):
                yield p

    def names(self) -> Iterator[ModelName]:
        """Every model name with a manifest in this store (not the fallbacks)."""
        for p in self._manifest_files():
            host, ns, model, tag = p.relative_to(self.manifests_dir).parts
            try:
                yield parse_name(f"{host}/{ns}/{model}:{tag}")
            except ModelError:  # a stray file is not a model; skip it
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
        return any(s.manifest_path(n).is_file() for s in [self, *self.fallbacks])

    def _read_blob(self, digest: str, cap: int, what: str) -> bytes:
        p = self.find_blob(digest)
        if p is None:
            raise StoreError(f"blob {digest} is missing from the store; pull the model again")
        try:
            return read_capped(p, cap, what)
        except OSError as e:
            raise StoreError(f"{what} ({digest}) is unreadable: {e.strerror}") from None

    def _read_text(self, digest: str, what: str = "a text layer") -> str:
        return self._read_blob(digest, MAX_TEXT_BYTES, what).decode("utf-8", errors="replace")

    def _read_json(self, digest: str, kind: type, what: str) -> Any:
        try:
            value = json.loads(self._read_blob(digest, MAX_TEXT_BYTES, what))
        except (ValueError, UnicodeDecodeError):
            value = None
        if not isinstance(value, kind):
            raise StoreError(
                f"{what} ({digest}) is not a JSON {kind.__name__}; remove the model and pull or "
                "create it again"
            )
        return value

    def _config(self, manifest: dict[str, Any]) -> dict[str, Any]:
        digest = manifest["config"]["digest"]
        p = self.find_blob(digest)
        if p is None:
            return {}
        try:
            return config_details(read_capped(p, MAX_CONFIG_BYTES, "a config"))
        except (OSError, StoreError):
            return {}

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
        adapters: list[Path] = []
        projectors: list[Path] = []
        licenses: list[str] = []
        messages: list[dict[str, Any]] = []
        for layer in manifest["layers"]:
            mt, digest = layer["mediaType"], layer["digest"]
            size += layer["size"]
            if mt == MEDIA_MODEL:
                model_path, model_digest = self.find_blob(digest), digest
                if model_path is None:
                    raise StoreError(
                        f"model blob {digest} of {n.display} is missing; pull it again"
                    )
            elif mt in (MEDIA_TEMPLATE, MEDIA_SYSTEM):
                text[mt] = self._read_text(digest, f"the {mt.rsplit('.', 1)[1]} of {n.display}")
            elif mt == MEDIA_PARAMS:
                params = self._read_json(digest, dict, f"the parameters of {n.display}")
            elif mt == MEDIA_LICENSE:
                licenses.append(self._read_text(digest, f"the license of {n.display}"))
            elif mt == MEDIA_MESSAGES:
                msgs = self._read_json(digest, list, f"the messages of {n.display}")
                # Only turns a chat can use: a role and a content that are text.
                messages.extend(
                    m
                    for m in msgs
                    if isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content", ""), str)
                )
            elif mt in (MEDIA_ADAPTER, MEDIA_PROJECTOR):
                p = self.find_blob(digest)
                if p is None:
                    raise StoreError(f"blob {digest} of {n.display} is missing; pull it again")
                (adapters if mt == MEDIA_ADAPTER else projectors).append(p)
        if model_path is None:
            raise StoreError(f"{n.display} has no model layer")
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
            config=self._config(manifest),
            manifest=manifest,
            modified_at=datetime.fromtimestamp(mpath.stat().st_mtime, UTC)
            if mpath.exists()
            else None,
            read_only=not store.writable,
        )

    def _listed(self, n: ModelName) -> ListedModel:
        raw = self.read_manifest_bytes(n)
        if raw is None:
            raise StoreError(f"the manifest of {n.display} vanished")
        m = self._parse(n, raw)
        return ListedModel(
            name=n,
            digest="sha256:" + hashlib.sha256(raw).hexdigest(),
            size_bytes=sum(layer["size"] for layer in m["layers"]),
            modified_at=datetime.fromtimestamp(self.manifest_path(n).stat().st_mtime, UTC),
            details=self._config(m),
            read_only=not self.writable,
        )

    def list(self) -> list[ListedModel]:
        """Every usable model in this store and the read-only ones (ours first when names clash).

        A model whose manifest cannot be read or used is left out (and logged), so one bad model
        never hides the others.
        """
        seen: dict[ModelName, ListedModel] = {}
        for store in [self, *self.fallbacks]:
            for n in store.names():
                if n in seen:
                    continue
                try:
                    seen[n] = store._listed(n)
                except (StoreError, OSError) as e:
                    log.warning("not listing %s: %s", n.display, e)
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

    def prune(self) -> builtins.list[str]:
        """Delete blobs no manifest refers to; returns their digests.

        Every manifest file counts, even one whose path is not a name offload would write (put
        there by hand or by another tool); when one cannot be read, nothing is deleted: its blobs
        are unknown.
        """
        used: set[str] = set()
        for p in self._manifest_files():
            try:
                m = check_manifest(read_capped(p, MAX_MANIFEST_BYTES, f"the manifest {p}"))
            except FileNotFoundError:  # removed since it was listed
                continue
            except (OSError, StoreError, InvalidManifest) as e:
                log.warning("keeping every blob: the manifest %s is unusable: %s", p, e)
                return []
            for layer in [m["config"], *m["layers"]]:
                used.add(check_digest(layer["digest"]))
        removed = []
        if self.blobs_dir.is_dir():
            for b in self.blobs_dir.iterdir():
                # Only whole blobs: "-partial" files and their state are resumable downloads.
                if BLOB_NAME.match(b.name) and b.name.replace("-", ":", 1) not in used:
                    b.unlink(missing_ok=True)
                    removed.append(b.name.replace("-", ":", 1))
        return removed

    def copy(self, src: str | ModelName, dst: str | ModelName) -> None:
        """Give a model a second name (the blobs are shared)."""
        s = parse_name(src) if isinstance(src, str) else src
        d = parse_name(dst) if isinstance(dst, str) else dst
        store, raw = self.locate_manifest(s)
        manifest = store._parse(s, raw)
        if store is not self:
            for layer in [manifest["config"], *manifest["layers"]]:
                if not self.blob_path(layer["digest"]).is_file():
                    self.blob_path(layer["digest"]).parent.mkdir(parents=True, exist_ok=True)
                    self.add_blob_file(store.blob_path(layer["digest"]), expected=layer["digest"])
        self.write_manifest_bytes(d, raw)

    @staticmethod
    def now() -> datetime:
        """Current UTC time (for callers that stamp things)."""
        return datetime.now(UTC)
