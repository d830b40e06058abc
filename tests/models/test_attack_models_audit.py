"""More hostile registries and hand-edited stores: each ends in a one-line typed error, in bounded
time and memory, and no model's blobs are lost.

The registries here are real HTTP servers on 127.0.0.1 that misbehave in ways ``RegistryServer``
has no switch for: a token endpoint that answers nonsense or never stops, a manifest that
trickles in a byte at a time, upload answers with no ``Location`` or an endless body.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from offload.models.layout import MEDIA_MODEL, MEDIA_SYSTEM
from offload.models.names import parse_name
from offload.models.store import Store
from tests.registry_server import gguf_bytes

Handler = Callable[[BaseHTTPRequestHandler], None]


class _Evil:
    """A loopback HTTP server answering every request with ``handle``; counts body bytes sent."""

    def __init__(self, handle: Handler) -> None:
        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                try:
                    handle(self)
                except OSError:
                    self.close_connection = True  # the client hung up, as it should

            do_GET = do_POST = do_PUT = do_PATCH = do_HEAD = _any  # noqa: N815

        self.sent = 0
        self.stop = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None  # type: ignore[method-assign]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def send(self, h: BaseHTTPRequestHandler, code: int, body: bytes = b"", **headers: str) -> None:
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k.replace("_", "-"), v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def endless(
        self, h: BaseHTTPRequestHandler, code: int, every_s: float = 0.0, **headers: str
    ) -> None:
        """A body with no length that goes on until the client leaves (1 MiB blocks, or one byte
        every ``every_s`` seconds)."""
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k.replace("_", "-"), v)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        block = b" " if every_s else b"x" * (1 << 20)
        while not self.stop.is_set() and self.sent < (1 << 30):
            h.wfile.write(block)
            h.wfile.flush()
            self.sent += len(block)
            if every_s:
                time.sleep(every_s)

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def evil_server(handle: Callable[[_Evil, BaseHTTPRequestHandler], None]) -> Iterator[_Evil]:
    box: list[_Evil] = []
    server = _Evil(lambda h: handle(box[0], h))
    box.append(server)
    try:
        yield server
    finally:
        server.close()


def in_thread(fn: Callable[[], object], limit_s: float) -> BaseException | None:
    """Run ``fn``; the exception it ended with, or fail the test when it runs past ``limit_s``."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit_s)
    assert out, f"still running after {limit_s}s"
    return out[0]


def one_line(e: BaseException | None, kind: type[BaseException], *words: str) -> None:
    assert isinstance(e, kind), repr(e)
    assert "\n" not in str(e) and all(w in str(e) for w in words), str(e)


def local_model(store: Store, name: str = "m") -> None:
    layers = [store.layer_for_bytes(MEDIA_MODEL, gguf_bytes(4096))]
    store.write_manifest(parse_name(name), store.new_manifest(layers, {"model_format": "gguf"}))


# -- the store ------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit", ["upper-case folder", "digest spelled with a dash"])
def test_removing_a_model_keeps_the_blobs_of_hand_placed_manifests(store: Store, edit: str) -> None:
    local_model(store, "other")
    mn = parse_name("kept")
    system = store.layer_for_bytes(MEDIA_SYSTEM, b"be brief")
    model = store.layer_for_bytes(MEDIA_MODEL, gguf_bytes(8192, seed=2))
    config = {"model_format": "gguf", "model_family": "kept"}
    store.write_manifest(mn, store.new_manifest([model, system], config))
    path = store.manifest_path(mn)
    if edit == "upper-case folder":
        # As another tool, or a user copying a store by hand, may have written it.
        shutil.move(path.parent, path.parent.with_name("Kept"))
    else:
        raw = json.loads(path.read_bytes())
        for layer in [raw["config"], *raw["layers"]]:
            layer["digest"] = layer["digest"].replace(":", "-")
        path.write_text(json.dumps(raw))
    blobs = sorted(p.name for p in store.blobs_dir.iterdir())
    store.delete("other")
    kept = sorted(p.name for p in store.blobs_dir.iterdir())
    for layer in (model, system):
        assert layer["digest"].replace(":", "-") in kept, f"{layer['mediaType']} blob was deleted"
    assert len(kept) == len(blobs) - 2  # the other model's weights and config went
