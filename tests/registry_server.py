"""A small but real OCI distribution v2 registry on 127.0.0.1, with switches for faults.

Serves manifests and blobs (GET/HEAD, ``Range``), can redirect blob downloads to another path as
Ollama's CDN does, accepts uploads (POST, PATCH, PUT ?digest=) and manifest PUTs. Fault switches:
drop the connection after N bytes of a blob, serve wrong bytes for a digest, answer 200 to ranged
requests, require authentication; and, as a malicious registry, send more bytes than a blob's
manifest declares, pad a manifest to any size, or send bodies without a Content-Length.
``bytes_served`` counts blob body bytes sent, ``manifest_bytes_served`` manifest bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def sha256(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gguf_bytes(n_bytes: int, seed: int = 1) -> bytes:
    """A valid GGUF of exactly ``n_bytes``: a small header, then one int8 tensor of random bytes."""
    import random

    def string(text: bytes) -> bytes:
        return struct.pack("<Q", len(text)) + text

    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    head += string(b"general.architecture") + struct.pack("<I", 8) + string(b"llama")
    n_data = n_bytes - (len(head) + len(string(b"w")) + 4 + 8 + 4 + 8 + 31) // 32 * 32
    head += string(b"w") + struct.pack("<IQIQ", 1, n_data, 24, 0)  # one dim, GGML_TYPE_I8
    head += bytes(-len(head) % 32)
    assert n_data > 0 and len(head) + n_data == n_bytes, "too small for a GGUF"
    return head + random.Random(seed).randbytes(n_data)


@dataclass
class RegistryState:
    """What the registry holds and which faults are switched on."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], bytes] = field(default_factory=dict)
    uploads: dict[str, bytearray] = field(default_factory=dict)
    redirect_blobs: bool = False
    drop_after_bytes: dict[str, int] = field(default_factory=dict)  # digest -> bytes, fires once
    stall_after_bytes: dict[str, int] = field(default_factory=dict)  # digest -> bytes, then hang
    release: threading.Event = field(default_factory=threading.Event)
    corrupt: set[str] = field(default_factory=set)
    ignore_range: bool = False
    require_auth: str | None = None  # None, or "401" / "403"
    extra_bytes: dict[str, int] = field(default_factory=dict)  # digest -> zeros after the blob
    padded_manifests: dict[tuple[str, str], int] = field(default_factory=dict)  # -> spaces after
    no_content_length: bool = False  # bodies end when the connection closes
    bytes_served: int = 0
    manifest_bytes_served: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_model(
        self, repo: str, tag: str, layers: list[tuple[str, bytes]], config: bytes = b"{}"
    ) -> bytes:
        """Store blobs and a manifest for ``repo:tag``; return the manifest bytes."""
        self.blobs[sha256(config)] = config
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [],
        }
        for media, data in layers:
            self.blobs[sha256(data)] = data
            manifest["layers"].append(
                {"mediaType": media, "digest": sha256(data), "size": len(data)}
            )
        raw = json.dumps(manifest, indent=2).encode()
        self.manifests[(repo, tag)] = raw
        return raw


_ROUTE = re.compile(r"^/v2/(?P<repo>.+?)/(?P<kind>manifests|blobs)/(?P<ref>[^/?]+)$")
_UPLOAD = re.compile(r"^/v2/(?P<repo>.+?)/blobs/uploads/(?P<id>[^/?]*)$")


class _Handler(BaseHTTPRequestHandler):
    state: RegistryState
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # ------------------------------------------------------------ helpers
    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        body = json.dumps({"errors": [{"code": "ERROR", "message": message}]}).encode()
        self._send(code, body, {"Content-Type": "application/json"})

    def _authorized(self) -> bool:
        mode = self.state.require_auth
        if mode is None:
            return True
        if mode == "403":
            self._error(403, "denied")
        else:
            self._error(401, "authentication required")
        return False

    def _path(self) -> tuple[str, str]:
        path, _, query = self.path.partition("?")
        return path, query

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    # ------------------------------------------------------------ reads
    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        path, _ = self._path()
        with self.state.lock:
            self.state.requests.append((self.command, path))
        if path.startswith("/cdn/"):
            return self._serve_blob(path[len("/cdn/") :])
        if not self._authorized():
            return
        m = _ROUTE.match(path)
        if not m:
            return self._error(404, "not found")
        repo, kind, ref = m["repo"], m["kind"], m["ref"]
        if kind == "manifests":
            raw = self.state.manifests.get((repo, ref))
            if raw is None:
                return self._error(404, f"manifest unknown: {repo}:{ref}")
            pad = self.state.padded_manifests.get((repo, ref), 0)
            if pad or self.state.no_content_length:
                return self._stream(raw, pad, {"Content-Type": MANIFEST_TYPE}, manifest=True)
            return self._send(
                200, raw, {"Content-Type": MANIFEST_TYPE, "Docker-Content-Digest": sha256(raw)}
            )
        if ref not in self.state.blobs:
            return self._error(404, "blob unknown")
        if self.state.redirect_blobs and self.command == "GET":
            return self._send(307, b"", {"Location": f"/cdn/{ref}"})
        return self._serve_blob(ref)

    def _stream(self, body: bytes, extra: int, headers: dict[str, str], manifest: bool) -> None:
        """``body`` then ``extra`` filler bytes (spaces for JSON, zeros for blobs), made lazily."""
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        if self.state.no_content_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body) + extra))
        self.end_headers()
        if self.command == "HEAD":
            return
        filler = (b" " if manifest else b"\0") * (1 << 20)
        sent = 0
        try:
            self.wfile.write(body)
            sent += len(body)
            while extra > 0:
                n = min(extra, len(filler))
                self.wfile.write(filler[:n])
                extra -= n
                sent += n
        except OSError:
            self.close_connection = True  # the client stopped reading, as it should
        finally:
            with self.state.lock:
                if manifest:
                    self.state.manifest_bytes_served += sent
                else:
                    self.state.bytes_served += sent

    def _serve_blob(self, digest: str) -> None:
        data = self.state.blobs.get(digest)
        if data is None:
            return self._error(404, "blob unknown")
        extra = self.state.extra_bytes.get(digest, 0)
        if (extra or self.state.no_content_length) and not self.headers.get("Range"):
            return self._stream(data, extra, {"Content-Type": "application/octet-stream"}, False)
        if digest in self.state.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range")
        code = 200
        if rng and not self.state.ignore_range:
            m = re.match(r"bytes=(\d+)-(\d*)$", rng)
            if not m:
                return self._error(416, "bad range")
            start = int(m[1])
            end = min(int(m[2]) if m[2] else end, len(data) - 1)
            if start > end:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            code = 206
        body = data[start : end + 1]
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if self.command == "HEAD":
            return
        with self.state.lock:
            drop = self.state.drop_after_bytes.pop(digest, None)
            stall = self.state.stall_after_bytes.pop(digest, None)
        if stall is not None:
            self.wfile.write(body[:stall])
            self.wfile.flush()
            with self.state.lock:
                self.state.bytes_served += stall
            # Hang mid-body (until released) so a test can kill the client at a known point.
            self.state.release.wait(30)
            self.close_connection = True
            return
        if drop is not None:
            part = body[:drop]
            self.wfile.write(part)
            self.wfile.flush()
            with self.state.lock:
                self.state.bytes_served += len(part)
            # Cut the connection mid-body, as a flaky network does.
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)
        with self.state.lock:
            self.state.bytes_served += len(body)

    # ------------------------------------------------------------ writes
    def do_POST(self) -> None:  # noqa: N802
        path, _ = self._path()
        self._body()
        if not self._authorized():
            return
        m = _UPLOAD.match(path)
        if not m:
            return self._error(404, "not found")
        upload_id = uuid.uuid4().hex
        with self.state.lock:
            self.state.uploads[upload_id] = bytearray()
        self._send(
            202, b"", {"Location": f"/v2/{m['repo']}/blobs/uploads/{upload_id}", "Range": "0-0"}
        )

    def do_PATCH(self) -> None:  # noqa: N802
        path, _ = self._path()
        body = self._body()
        m = _UPLOAD.match(path)
        if not m or m["id"] not in self.state.uploads:
            return self._error(404, "upload unknown")
        buf = self.state.uploads[m["id"]]
        buf += body
        self._send(202, b"", {"Location": path, "Range": f"0-{len(buf) - 1}"})

    def do_PUT(self) -> None:  # noqa: N802
        path, query = self._path()
        body = self._body()
        if not self._authorized():
            return
        m = _UPLOAD.match(path)
        if m:
            buf = self.state.uploads.pop(m["id"], None)
            if buf is None:
                return self._error(404, "upload unknown")
            buf += body
            digest = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("digest", "")
            digest = digest.replace("%3A", ":")
            if sha256(bytes(buf)) != digest:
                return self._error(400, "digest invalid")
            self.state.blobs[digest] = bytes(buf)
            return self._send(201, b"", {"Location": f"/v2/{m['repo']}/blobs/{digest}"})
        r = _ROUTE.match(path)
        if not r or r["kind"] != "manifests":
            return self._error(404, "not found")
        manifest = json.loads(body)
        for layer in [manifest["config"], *manifest["layers"]]:
            if layer["digest"] not in self.state.blobs:
                return self._error(400, f"blob unknown: {layer['digest']}")
        self.state.manifests[(r["repo"], r["ref"])] = body
        self._send(201, b"", {"Docker-Content-Digest": sha256(body)})


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (a killed pull, a test's dropped connection) are expected here.
        pass


class RegistryServer:
    """Run a registry on an ephemeral port of 127.0.0.1; use as a context manager."""

    def __init__(self) -> None:
        self.state = RegistryState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``, the host part of model names on this registry."""
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> RegistryServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.state.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
