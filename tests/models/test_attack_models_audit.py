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
from contextlib import AbstractContextManager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from offload.models import embedded, registry
from offload.models.errors import AuthRequired, RegistryError, StoreError
from offload.models.layout import MEDIA_MESSAGES, MEDIA_MODEL, MEDIA_PARAMS, MEDIA_SYSTEM
from offload.models.names import parse_name
from offload.models.store import Store
from tests.registry_server import MANIFEST_TYPE, gguf_bytes, sha256
from tests.serve_process import ServeProcess

CONFIG = "application/vnd.docker.container.image.v1+json"
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


# -- pull -----------------------------------------------------------------------------------------


def test_a_manifest_trickled_a_byte_at_a_time_ends_the_pull_in_bounded_time(
    tmp_path: Path,
) -> None:
    def handle(ev: _Evil, h: BaseHTTPRequestHandler) -> None:
        ev.endless(h, 200, every_s=0.2, Content_Type=MANIFEST_TYPE)

    with evil_server(handle) as ev:
        store = Store(tmp_path / "store")
        t0 = time.monotonic()
        pull = lambda: registry.pull(store, f"{ev.host}/a/b", insecure=True, timeout_s=2)  # noqa: E731
        err = in_thread(pull, 30)
        one_line(err, RegistryError, "took more than 2s to send a manifest", "try again later")
        assert time.monotonic() - t0 < 10
        assert not (tmp_path / "store" / "manifests").exists()


@pytest.mark.parametrize("answer", [b"[]", b'"tok"', b'{"token": 7}', b'{"token": "a\\nb"}'])
def test_a_token_endpoint_answering_nonsense_is_an_auth_error(
    tmp_path: Path, answer: bytes
) -> None:
    def handle(ev: _Evil, h: BaseHTTPRequestHandler) -> None:
        if h.path.startswith("/token"):
            return ev.send(h, 200, answer, Content_Type="application/json")
        realm = f'Bearer realm="http://{ev.host}/token",service="x"'
        ev.send(h, 401, b"{}", WWW_Authenticate=realm)

    with evil_server(handle) as ev:
        err = in_thread(
            lambda: registry.pull(Store(tmp_path / "s"), f"{ev.host}/a/b", insecure=True), 30
        )
        one_line(err, AuthRequired, "requires authentication", "answered 401")


def test_an_endless_token_answer_is_not_read_into_memory(tmp_path: Path) -> None:
    def handle(ev: _Evil, h: BaseHTTPRequestHandler) -> None:
        if h.path.startswith("/token"):
            return ev.endless(h, 200, Content_Type="application/json")
        realm = f'Bearer realm="http://{ev.host}/token"'
        ev.send(h, 401, b"{}", WWW_Authenticate=realm)

    with evil_server(handle) as ev:
        err = in_thread(
            lambda: registry.pull(Store(tmp_path / "s"), f"{ev.host}/a/b", insecure=True), 60
        )
        one_line(err, AuthRequired, "requires authentication")
        assert ev.sent < 32 << 20, f"{ev.sent >> 20} MiB of a token were read"


def _model_manifest(blob: bytes) -> bytes:
    config = {"mediaType": CONFIG, "digest": sha256(b"{}"), "size": 2}
    layer = {"mediaType": MEDIA_MODEL, "digest": sha256(blob), "size": len(blob)}
    return json.dumps(
        {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config, "layers": [layer]}
    ).encode()


@pytest.mark.parametrize(
    ("where", "answer"),
    [
        ("manifest", "redirect loop"),
        ("manifest", "broken gzip"),
        ("blob", "redirect loop"),
        ("blob", "broken gzip"),
    ],
)
def test_redirect_loops_and_undecodable_bodies_are_registry_errors(
    tmp_path: Path, where: str, answer: str
) -> None:
    blob = gguf_bytes(4096)

    def handle(ev: _Evil, h: BaseHTTPRequestHandler) -> None:
        hit = "/manifests/" in h.path if where == "manifest" else h.path.endswith(sha256(blob))
        if hit and answer == "redirect loop":
            return ev.send(h, 307, Location=h.path)
        if hit:
            return ev.send(h, 200, b"not gzip at all", Content_Encoding="gzip")
        if "/manifests/" in h.path:
            return ev.send(h, 200, _model_manifest(blob), Content_Type=MANIFEST_TYPE)
        ev.send(h, 200, b"{}")

    with evil_server(handle) as ev:
        store = Store(tmp_path / "store")
        err = in_thread(lambda: registry.pull(store, f"{ev.host}/a/b", insecure=True), 30)
        one_line(err, RegistryError, "with something offload cannot use", "check the name")
        assert not store.manifests_dir.exists()


# -- push -----------------------------------------------------------------------------------------


def _upload_server(
    post: Callable[[_Evil, BaseHTTPRequestHandler], None],
) -> AbstractContextManager[_Evil]:
    def handle(ev: _Evil, h: BaseHTTPRequestHandler) -> None:
        if h.command == "HEAD":
            return ev.send(h, 404)
        if h.command == "POST":
            return post(ev, h)
        ev.send(h, 201, Location="/v2/a/b/blobs/x")

    return evil_server(handle)


def test_an_upload_answer_with_no_location_is_a_registry_error(store: Store) -> None:
    local_model(store)
    with _upload_server(lambda ev, h: ev.send(h, 202)) as ev:
        err = in_thread(
            lambda: registry.push(store, f"{ev.host}/a/b", source="m", insecure=True), 30
        )
        one_line(err, RegistryError, "no usable upload location")


def test_an_upload_answer_with_a_broken_location_is_a_registry_error(store: Store) -> None:
    local_model(store)
    with _upload_server(lambda ev, h: ev.send(h, 202, Location="http://[::1")) as ev:
        err = in_thread(
            lambda: registry.push(store, f"{ev.host}/a/b", source="m", insecure=True), 30
        )
        one_line(err, RegistryError, "no usable upload location")


def test_an_endless_upload_answer_is_not_read(store: Store) -> None:
    local_model(store)
    post = lambda ev, h: ev.endless(h, 202, Location="/v2/a/b/blobs/uploads/1")  # noqa: E731
    with _upload_server(post) as ev:
        err = in_thread(
            lambda: registry.push(store, f"{ev.host}/a/b", source="m", insecure=True), 60
        )
        assert err is None, repr(err)
        assert ev.sent < 32 << 20, f"{ev.sent >> 20} MiB of an upload answer were read"


def test_pushing_a_model_whose_manifest_or_blob_is_damaged_names_the_problem(
    store: Store,
) -> None:
    local_model(store, "cut")
    path = store.manifest_path(parse_name("cut"))
    path.write_bytes(path.read_bytes()[:40])
    local_model(store, "hole")
    model = json.loads(store.manifest_path(parse_name("hole")).read_bytes())["layers"][0]
    store.blob_path(model["digest"]).unlink()
    with _upload_server(lambda ev, h: ev.send(h, 202, Location="/up")) as ev:
        for name, words in (("cut", "is unusable"), ("hole", "is missing from the store")):
            err = in_thread(
                lambda n=name: registry.push(store, f"{ev.host}/a/b", source=n, insecure=True), 30
            )
            one_line(err, StoreError, words, "pull")


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


# -- over HTTP ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    home = tmp_path_factory.mktemp("audit-home")
    embedded.import_default(Store(home / "models"))
    with ServeProcess(home) as s:
        yield s


LONG_HOST = "h" * 250 + ":12345"  # a valid host and port, but longer than a file name may be


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/copy", {"source": "gemma3:270m", "destination": f"{LONG_HOST}/a/b"}),
        ("POST", "/api/show", {"model": f"{LONG_HOST}/a/b"}),
        ("POST", "/api/create", {"model": f"{LONG_HOST}/a/b", "from": "gemma3:270m"}),
        ("DELETE", "/api/delete", {"model": f"{LONG_HOST}/a/b"}),
        ("POST", "/api/pull", {"model": f"{LONG_HOST}/a/b", "stream": False}),
        ("POST", "/api/generate", {"model": f"{LONG_HOST}/a/b", "prompt": "hi", "stream": False}),
    ],
    ids=["copy", "show", "create", "delete", "pull", "generate"],
)
def test_a_host_longer_than_a_file_name_is_a_400_naming_it(
    server: ServeProcess, method: str, path: str, body: dict[str, Any]
) -> None:
    r = httpx.request(method, f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert "the host is longer than 255 characters" in r.json()["error"]
    assert "\n" not in r.text


def test_a_host_of_255_characters_still_names_a_model(server: ServeProcess) -> None:
    name = f"{'h' * 249}:12345/a/b:c"
    r = httpx.post(
        f"{server.url}/api/copy",
        json={"source": "gemma3:270m", "destination": name},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    r = httpx.post(f"{server.url}/api/show", json={"model": name}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.request("DELETE", f"{server.url}/api/delete", json={"model": name}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("media", "what"), [(MEDIA_PARAMS, "parameters"), (MEDIA_MESSAGES, "messages")]
)
def test_a_damaged_parameters_or_messages_blob_says_what_to_do(
    store: Store, media: str, what: str
) -> None:
    model = store.layer_for_bytes(MEDIA_MODEL, gguf_bytes(4096))
    layer = store.layer_for_bytes(media, b'{"temperature": 0.5}' if what == "parameters" else b"[]")
    store.write_manifest(parse_name("m"), store.new_manifest([model, layer], {}))
    store.blob_path(layer["digest"]).write_bytes(b"[1, 2" if what == "parameters" else b"{}")
    with pytest.raises(StoreError) as err:
        store.resolve("m")
    one_line(
        err.value, StoreError, f"the {what} of m:latest", "remove the model and pull or create"
    )
