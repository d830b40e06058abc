"""Pull from and push to registries speaking OCI distribution v2 (registry.ollama.ai, hf.co, ...).

A pull fetches the manifest, then the config and layers into ``blobs/``: large blobs in parallel
ranged chunks, resuming from partial files (``Range``, and starting over on a 200), each verified
against its sha256 before an atomic rename, under a file lock per blob. The manifest is written
last, so a pull that dies midway never leaves a model that looks complete. httpx lives only here.

A registry is untrusted: the manifest is read under a size cap and its shape checked, declared
sizes are capped by media type and checked against free disk space before anything is written,
no blob is read past its declared size, and each blob's content is checked for its media type
(a config is a JSON object, a model is a GGUF whose header passes) before it enters the store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from filelock import FileLock

from offload.models.errors import (
    AuthRequired,
    BlobOverflow,
    DigestMismatch,
    DiskFull,
    DownloadInterrupted,
    RegistryError,
    RegistryModelNotFound,
    RegistryUnreachable,
    StoreError,
)
from offload.models.layout import (
    GGUF_MEDIA,
    MAX_MANIFEST_BYTES,
    MEDIA_CONFIG,
    MEDIA_MANIFEST,
    MEDIA_MESSAGES,
    MEDIA_PARAMS,
    InvalidManifest,
    atomic_write,
    check_digest,
    check_manifest,
    no_space,
    read_capped,
    sha256_file,
)
from offload.models.names import ModelName, parse_name
from offload.models.store import Store
from offload.planner.errors import GGUFError
from offload.planner.gguf_header import read_header

__all__ = ["Progress", "pull", "push", "CHUNK_BYTES"]

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
CHUNK_BYTES = 64 * 1024 * 1024
_STATE_EVERY_BYTES = 8 * 1024 * 1024
# Room left free after a download: a disk filled to the last byte breaks more than the pull.
_DISK_RESERVE_BYTES = 256 * 1024 * 1024
# A bearer token is a few KB of JSON.
_MAX_TOKEN_BYTES = 1 << 20


def _noop(_: dict[str, Any]) -> None:
    pass


def _base_url(name: ModelName, insecure: bool) -> str:
    scheme = "http" if insecure else "https"
    return f"{scheme}://{name.host}/v2/{name.namespace}/{name.model}"


@contextmanager
def _client(timeout_s: float) -> Iterator[httpx.Client]:
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
    with httpx.Client(follow_redirects=True, timeout=timeout) as client:
        yield client


class _Session:
    """One registry conversation: maps transport failures and 401/403/404 to our errors."""

    def __init__(self, client: httpx.Client, name: ModelName) -> None:
        self.client, self.name = client, name
        self.token: str | None = None

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def check(self, r: httpx.Response, what: str) -> None:
        if r.status_code in (401, 403):
            raise AuthRequired(self.name.display, self.name.host, r.status_code)
        if r.status_code == 404:
            raise RegistryModelNotFound(self.name.display, self.name.host)
        if r.status_code >= 400:
            raise RegistryError(f"{self.name.host} answered {r.status_code} to {what}")

    def _anonymous_token(self, r: httpx.Response) -> bool:
        """Try the Bearer challenge anonymously, as docker does for public repositories."""
        challenge = r.headers.get("WWW-Authenticate", "")
        if self.token or not challenge.lower().startswith("bearer "):
            return False
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("http://", "https://")):
            return False
        try:
            with self.client.stream("GET", realm, params=params) as t:
                if not t.is_success:
                    return False
                answer = json.loads(self._read_capped(t, _MAX_TOKEN_BYTES, "a token"))
        except (httpx.HTTPError, ValueError, RegistryError):
            return False
        token = (
            answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        )
        self.token = token if isinstance(token, str) and token.isprintable() else None
        return bool(self.token)

    def _read_capped(self, r: httpx.Response, cap: int, what: str) -> bytes:
        """The body of a small document, refused past ``cap`` bytes or past the session's time."""
        declared = r.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            raise RegistryError(
                f"{self.name.host} sent {what} of {declared} bytes, more than the {cap} allowed"
            )
        # Each read may wait the client's timeout; the whole document gets that long too, so a
        # registry that trickles a byte at a time cannot keep a pull waiting for days.
        allowed_s = self.client.timeout.read or 60.0
        deadline = time.monotonic() + allowed_s
        body = bytearray()
        for block in r.iter_bytes():
            body += block
            if len(body) > cap:
                raise RegistryError(
                    f"{self.name.host} sent {what} of more than the {cap} bytes allowed"
                )
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"{self.name.host} took more than {allowed_s:g}s to send {what} "
                    f"({len(body)} bytes so far); try again later"
                )
        return bytes(body)

    def request(self, method: str, url: str, what: str, **kw: Any) -> httpx.Response:
        """Send a request and raise a typed error for anything but success.

        Only the status and headers are kept: the answer's body is never read, so a registry
        cannot make us hold an endless one.
        """
        extra = kw.pop("headers", None)
        try:
            r = self._send(method, url, self._headers(extra), kw)
            if r.status_code == 401 and self._anonymous_token(r):
                r = self._send(method, url, self._headers(extra), kw)
        except httpx.TransportError as exc:
            raise RegistryUnreachable(self.name.host, _reason(exc)) from exc
        except httpx.HTTPError as exc:
            raise _unusable(self.name.host, what, exc) from exc
        self.check(r, what)
        return r

    def _send(
        self, method: str, url: str, headers: dict[str, str], kw: dict[str, Any]
    ) -> httpx.Response:
        r = self.client.send(
            self.client.build_request(method, url, headers=headers, **kw), stream=True
        )
        r.close()
        return r

    def location(self, r: httpx.Response, what: str, default: str | None = None) -> str:
        """The absolute URL an upload answer points at; ``RegistryError`` when it names none."""
        value = r.headers.get("Location", default)
        try:
            if not value:
                raise httpx.InvalidURL("no Location header")
            return str(r.url.join(value))
        except httpx.InvalidURL as exc:
            raise RegistryError(
                f"{self.name.host} answered {what} with no usable upload location ({exc}); "
                "is it a registry?"
            ) from None

    def get_capped(self, url: str, headers: dict[str, str], cap: int, what: str) -> bytes:
        """GET a small document, reading at most ``cap`` bytes of it."""
        for attempt in range(2):
            try:
                with self.client.stream("GET", url, headers=self._headers(headers)) as r:
                    if r.status_code == 401 and attempt == 0 and self._anonymous_token(r):
                        continue
                    self.check(r, what)
                    return self._read_capped(r, cap, what)
            except (httpx.TransportError, httpx.StreamError) as exc:
                raise RegistryUnreachable(self.name.host, _reason(exc)) from exc
            except httpx.HTTPError as exc:
                raise _unusable(self.name.host, what, exc) from exc
        raise AuthRequired(self.name.display, self.name.host, 401)

    @contextmanager
    def stream(self, url: str, headers: dict[str, str]) -> Iterator[httpx.Response]:
        """GET ``url`` streaming; the caller reads the body."""
        try:
            with self.client.stream("GET", url, headers=self._headers(headers)) as r:
                if r.status_code != 416:
                    self.check(r, f"GET {url}")
                yield r
        except httpx.ConnectError as exc:
            raise RegistryUnreachable(self.name.host, _reason(exc)) from exc
        except (httpx.TransportError, httpx.StreamError):
            raise  # an interruption: the caller keeps what it has, to resume
        except httpx.HTTPError as exc:
            raise _unusable(self.name.host, "a blob download", exc) from exc


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _unusable(host: str, what: str, exc: Exception) -> RegistryError:
    """An answer no retry can mend: a redirect loop, a body that does not decode."""
    return RegistryError(
        f"{host} answered {what} with something offload cannot use ({_reason(exc)}); check the "
        "name and the registry"
    )


def _write(f: Any, data: bytes, path: Path, done: int, total: int) -> None:
    try:
        with no_space(path, done_bytes=done, total_bytes=total):
            f.write(data)
    except DiskFull as exc:
        raise DiskFull(str(path), done, total, resumable=True) from exc


def _check_room(store: Store, name: ModelName, layers: list[dict[str, Any]]) -> None:
    """Refuse a pull the disk cannot hold, before a byte is written."""
    needed = 0
    for layer in layers:
        final = store.blob_path(layer["digest"])
        if store.find_blob(layer["digest"]) is not None:
            continue
        partial = final.with_name(final.name + "-partial")
        have = (
            partial.stat().st_size if partial.exists() and not _state_path(partial).exists() else 0
        )
        needed += max(0, layer["size"] - have)
    store.blobs_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store.blobs_dir).free
    if needed and needed + _DISK_RESERVE_BYTES > free:
        raise DiskFull(name.display, total_bytes=needed, free_bytes=free)


def _check_content(path: Path, layer: dict[str, Any], host: str) -> None:
    """Refuse a downloaded blob whose content does not fit its media type."""
    media = layer["mediaType"]
    what = {MEDIA_CONFIG: "config", MEDIA_PARAMS: "parameters", MEDIA_MESSAGES: "messages"}
    if media in GGUF_MEDIA:
        try:
            read_header(path)
        except GGUFError as e:
            raise RegistryError(
                f"{host} sent a {media.rsplit('.', 1)[1]} layer offload refuses: {e.problem}"
            ) from None
    elif media in what:
        kind = list if media == MEDIA_MESSAGES else dict
        try:
            value = json.loads(read_capped(path, layer["size"], what[media]))
        except (ValueError, UnicodeDecodeError):
            value = None
        if not isinstance(value, kind):
            raise RegistryError(
                f"{host} sent {what[media]} that is not a JSON {kind.__name__}; offload refuses it"
            )


# ------------------------------------------------------------------------------------ pull
def pull(
    store: Store,
    name: str | ModelName,
    *,
    insecure: bool = False,
    progress: Progress | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    parallel: int = 4,
    retries: int = 3,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Pull ``name`` into ``store``; return the manifest. ``progress`` gets Ollama's progress dicts."""
    mn = parse_name(name) if isinstance(name, str) else name
    report = progress or _noop
    base = _base_url(mn, insecure)
    with _client(timeout_s) as client:
        s = _Session(client, mn)
        report({"status": "pulling manifest"})
        raw = s.get_capped(
            f"{base}/manifests/{mn.tag}",
            {"Accept": MEDIA_MANIFEST},
            MAX_MANIFEST_BYTES,
            "a manifest",
        )
        try:
            manifest = check_manifest(raw)
        except InvalidManifest as exc:
            raise RegistryError(
                f"{mn.host} sent a manifest offload cannot use: {exc.problem}"
            ) from None
        layers = [manifest["config"], *manifest["layers"]]
        _check_room(store, mn, layers)
        for layer in layers:
            _pull_blob(s, base, store, layer, report, chunk_bytes, parallel, retries)
        report({"status": "verifying sha256 digest"})
        for layer in layers:
            # Another process's rm could race us; check before the manifest makes the model visible.
            p = store.blob_path(layer["digest"])
            if not p.exists() or p.stat().st_size != layer["size"]:
                raise RegistryError(f"blob {layer['digest']} vanished during the pull; pull again")
        report({"status": "writing manifest"})
        store.write_manifest_bytes(mn, raw)
        report({"status": "success"})
        log.info("pulled %s (%d layers)", mn.full, len(layers))
        return manifest


def _pull_blob(
    s: _Session,
    base: str,
    store: Store,
    layer: dict[str, Any],
    report: Progress,
    chunk_bytes: int,
    parallel: int,
    retries: int,
) -> None:
    digest, size = check_digest(layer["digest"]), layer["size"]
    final = store.blob_path(digest)
    status = f"pulling {digest[7:19]}"

    def tell(done: int) -> None:
        report({"status": status, "digest": digest, "total": size, "completed": done})

    if final.exists() and final.stat().st_size == size:
        tell(size)
        return
    locks = store.root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Two pulls of one blob at once: the second waits, then finds the blob committed.
    with FileLock(str(locks / (final.name + ".lock"))):
        if final.exists() and final.stat().st_size == size:
            tell(size)
            return
        elsewhere = store.find_blob(digest)
        if elsewhere is not None and elsewhere != final:
            # The read-only Ollama store has it: a local copy beats a download.
            store.add_blob_file(elsewhere, expected=digest)
            tell(size)
            return
        partial = final.with_name(final.name + "-partial")
        url = f"{base}/blobs/{digest}"
        for attempt in range(retries + 1):
            try:
                if size > chunk_bytes and parallel > 1:
                    ok = _download_chunks(s, url, partial, size, chunk_bytes, parallel, tell)
                    if not ok:  # the server ignores Range: fall back to one stream
                        _download_stream(s, url, partial, size, tell)
                else:
                    _download_stream(s, url, partial, size, tell)
                break
            except DownloadInterrupted:
                if attempt == retries:
                    raise
                log.warning(
                    "retrying %s after an interruption (%d/%d)", digest, attempt + 1, retries
                )
            except BlobOverflow:
                _discard(partial)  # a registry that misbehaves gets no second chance here
                raise
        actual = sha256_file(partial)
        if actual != digest:
            _discard(partial)
            raise DigestMismatch(digest, actual)
        try:
            _check_content(partial, layer, s.name.host)
        except RegistryError:
            _discard(partial)
            raise
        os.replace(partial, final)
        _state_path(partial).unlink(missing_ok=True)


def _discard(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    _state_path(partial).unlink(missing_ok=True)


def _download_stream(
    s: _Session, url: str, partial: Path, size: int, tell: Callable[[int], None]
) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    state_file = _state_path(partial)
    if state_file.exists():
        # Left by a chunked download: only the unbroken run of bytes from the start is valid.
        have = 0
        try:
            saved = json.loads(state_file.read_text())
            for done in saved["done"]:
                have += int(done)
                if int(done) < int(saved["chunk_bytes"]):
                    break
        except (OSError, ValueError, KeyError, TypeError):
            have = 0
        with open(partial, "r+b" if partial.exists() else "wb") as f:
            f.truncate(have)
        state_file.unlink()
    if have > size:
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    tell(have)
    digest = url.rsplit("/", 1)[-1]
    try:
        with s.stream(url, headers) as r:
            if r.status_code == 416 and have == size:
                return
            if r.status_code == 200:
                have = 0  # a 200 to a ranged request is the whole blob: start over
            elif r.status_code == 206:
                start = _range_start(r)
                if start != have:
                    raise RegistryError(f"{url} answered a range from {start}, asked for {have}")
            else:
                raise RegistryError(f"{url} answered {r.status_code}")
            declared = r.headers.get("Content-Length", "")
            if declared.isdigit() and have + int(declared) > size:
                raise BlobOverflow(s.name.host, digest, size)
            with open(partial, "ab" if have else "wb") as f:
                for block in r.iter_bytes():
                    if have + len(block) > size:
                        # Never more than declared: what fits is kept, the rest is not read.
                        _write(f, block[: size - have], partial, have, size)
                        raise BlobOverflow(s.name.host, digest, size)
                    _write(f, block, partial, have, size)
                    have += len(block)
                    tell(have)
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise DownloadInterrupted(digest, have, size, _reason(exc)) from exc
    if have != size:
        raise DownloadInterrupted(digest, have, size, "short body")


def _range_start(r: httpx.Response) -> int:
    m = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else -1


def _state_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _download_chunks(
    s: _Session,
    url: str,
    partial: Path,
    size: int,
    chunk_bytes: int,
    parallel: int,
    tell: Callable[[int], None],
) -> bool:
    """Fetch ``size`` bytes as ranged chunks in parallel; False when the server ignores ``Range``."""
    starts = list(range(0, size, chunk_bytes))
    lengths = [min(chunk_bytes, size - st) for st in starts]
    state_file = _state_path(partial)
    done = [0] * len(starts)
    try:
        saved = json.loads(state_file.read_text())
        if saved.get("size") == size and saved.get("chunk_bytes") == chunk_bytes:
            done = [min(int(d), n) for d, n in zip(saved["done"], lengths, strict=True)]
    except (OSError, ValueError, KeyError, TypeError):
        if partial.exists():
            # A partial from a single-stream download: its bytes are valid from the start.
            have = partial.stat().st_size
            done = [max(0, min(have - st, n)) for st, n in zip(starts, lengths, strict=True)]
    lock = threading.Lock()
    stop = threading.Event()
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)

    def save() -> None:
        with lock:
            data = json.dumps({"size": size, "chunk_bytes": chunk_bytes, "done": done}).encode()
        atomic_write(state_file, data)

    def work(i: int) -> bool:
        offset = starts[i] + done[i]
        end = starts[i] + lengths[i] - 1
        if offset > end:
            return True
        unsaved = 0
        with s.stream(url, {"Range": f"bytes={offset}-{end}"}) as r:
            if r.status_code == 200:
                return False
            if r.status_code != 206 or _range_start(r) != offset:
                raise RegistryError(f"{url} answered {r.status_code} to a ranged request")
            declared = r.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > end + 1 - offset:
                raise BlobOverflow(s.name.host, url.rsplit("/", 1)[-1], size)
            for block in r.iter_bytes():
                if stop.is_set():
                    break
                if len(block) > end + 1 - offset:
                    raise BlobOverflow(s.name.host, url.rsplit("/", 1)[-1], size)
                try:
                    with no_space(partial):
                        os.pwrite(fd, block, offset)
                except DiskFull as exc:
                    raise DiskFull(str(partial), sum(done), size, resumable=True) from exc
                offset += len(block)
                unsaved += len(block)
                with lock:
                    done[i] += len(block)
                    total = sum(done)
                tell(total)
                if unsaved >= _STATE_EVERY_BYTES:
                    save()
                    unsaved = 0
        return done[i] == lengths[i]

    try:
        with no_space(partial):
            os.ftruncate(fd, size)
        tell(sum(done))
        todo = [i for i in range(len(starts)) if done[i] < lengths[i]]
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = [pool.submit(work, i) for i in todo]
            errors: list[BaseException] = []
            results: list[bool] = []
            for fut in futures:
                try:
                    results.append(fut.result())
                except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
                    stop.set()
                    errors.append(exc)
        if any(r is False for r in results) and not errors:
            os.close(fd)
            fd = -1
            partial.unlink(missing_ok=True)
            state_file.unlink(missing_ok=True)
            return False
        if errors:
            first = errors[0]
            if isinstance(first, (httpx.TransportError, httpx.StreamError)):
                raise DownloadInterrupted(
                    url.rsplit("/", 1)[-1], sum(done), size, _reason(first)
                ) from first
            raise first
        if sum(done) != size:
            raise DownloadInterrupted(url.rsplit("/", 1)[-1], sum(done), size, "short body")
        return True
    finally:
        if fd >= 0:
            os.close(fd)
            if partial.exists():
                save()


# ------------------------------------------------------------------------------------ push
def push(
    store: Store,
    name: str | ModelName,
    *,
    source: str | ModelName | None = None,
    insecure: bool = False,
    progress: Progress | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    timeout_s: float = 60.0,
) -> None:
    """Upload ``source`` (default: ``name``) as ``name``: blobs the registry lacks, then the manifest."""
    mn = parse_name(name) if isinstance(name, str) else name
    src = source if source is not None else mn
    src = parse_name(src) if isinstance(src, str) else src
    holder, manifest_raw = store.locate_manifest(src)
    manifest = holder._parse(src, manifest_raw)
    layers = [manifest["config"], *manifest["layers"]]
    files = {layer["digest"]: holder.find_blob(layer["digest"]) for layer in layers}
    missing = next((d for d, p in files.items() if p is None), None)
    if missing is not None:
        raise StoreError(
            f"blob {missing} of {src.display} is missing from the store; pull the model again"
        )
    media = manifest.get("mediaType")
    report = progress or _noop
    base = _base_url(mn, insecure)
    report({"status": "retrieving manifest"})
    with _client(timeout_s) as client:
        s = _Session(client, mn)
        for layer in layers:
            digest, size = check_digest(layer["digest"]), int(layer["size"])
            status = f"pushing {digest[7:19]}"
            head = _head(s, f"{base}/blobs/{digest}")
            if head == 200:
                report({"status": status, "digest": digest, "total": size, "completed": size})
                continue
            r = s.request("POST", f"{base}/blobs/uploads/", "starting an upload")
            location = s.location(r, "starting an upload")
            sent = 0
            report({"status": status, "digest": digest, "total": size, "completed": 0})
            with open(files[layer["digest"]] or "", "rb") as f:
                while block := f.read(chunk_bytes):
                    r = s.request(
                        "PATCH",
                        location,
                        "an upload chunk",
                        content=block,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Range": f"{sent}-{sent + len(block) - 1}",
                        },
                    )
                    location = s.location(r, "an upload chunk", location)
                    sent += len(block)
                    report({"status": status, "digest": digest, "total": size, "completed": sent})
            sep = "&" if "?" in location else "?"
            s.request("PUT", f"{location}{sep}digest={digest}", "finishing an upload", content=b"")
        report({"status": "pushing manifest"})
        s.request(
            "PUT",
            f"{base}/manifests/{mn.tag}",
            "the manifest upload",
            content=manifest_raw,
            headers={"Content-Type": media if isinstance(media, str) else MEDIA_MANIFEST},
        )
        report({"status": "success"})


def _head(s: _Session, url: str) -> int:
    try:
        r = s.client.head(url, headers=s._headers(None))
    except httpx.TransportError as exc:
        raise RegistryUnreachable(s.name.host, _reason(exc)) from exc
    except httpx.HTTPError as exc:
        raise _unusable(s.name.host, "HEAD blob", exc) from exc
    if r.status_code in (401, 403):
        s.check(r, "HEAD blob")
    return r.status_code
