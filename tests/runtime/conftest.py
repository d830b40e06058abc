"""A real offload server (uvicorn in a thread, 127.0.0.1, free port) over a temporary store.

The store holds the real gemma3:270m, a second name for it (``other:latest``, for eviction), and
two models over the same blob whose templates support tools and thinking.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from offload.models import embedded
from offload.models.names import parse_name
from offload.models.store import MEDIA_MODEL, MEDIA_TEMPLATE, Store
from offload.runtime.server.app import create_app
from offload.runtime.serving.scheduler import Scheduler

MODEL = "gemma3:270m"
OTHER = "other:latest"
TOOLS_MODEL = "toolsy:latest"
THINK_MODEL = "thinky:latest"

# A chatml-like template that renders .Tools, as qwen's does; the answer is parsed for calls.
TOOLS_TEMPLATE = """{{- if .Tools }}<start_of_turn>user
You may call these tools by answering with JSON {"name": ..., "arguments": {...}}:
{{- range .Tools }} {{ .Function.Name }}{{ end }}<end_of_turn>
{{ end }}
{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}
{{ .Content }}<end_of_turn>
{{ end }}<start_of_turn>model
"""

# A template with a reasoning section (.Thinking / .Think), as reasoning models have.
THINK_TEMPLATE = """{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}
{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ .Content }}<end_of_turn>
{{ end }}<start_of_turn>model
{{ if .Think }}<think>{{ end }}"""


@dataclass
class Running:
    """A running server: its base URL, app and scheduler."""

    url: str
    app: FastAPI
    store: Store

    @property
    def scheduler(self) -> Scheduler:
        """The server's scheduler (for reading what the engine did)."""
        return self.app.state.scheduler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model_with_template(store: Store, name: str, template: str) -> None:
    base = store.read_manifest(parse_name(MODEL))
    assert base is not None
    model_layer = next(layer for layer in base["layers"] if layer["mediaType"] == MEDIA_MODEL)
    layers = [model_layer, store.layer_for_bytes(MEDIA_TEMPLATE, template.encode())]
    config = {
        "model_format": "gguf",
        "model_family": "gemma3",
        "model_families": ["gemma3"],
        "model_type": "268M",
        "file_type": "Q4_K_M",
    }
    store.write_manifest(parse_name(name), store.new_manifest(layers, config))


def make_store(home: Path) -> Store:
    """A store with the test models in it."""
    store = Store(home / "models")
    embedded.ensure(store, MODEL)
    store.copy(MODEL, OTHER)
    _model_with_template(store, TOOLS_MODEL, TOOLS_TEMPLATE)
    _model_with_template(store, THINK_MODEL, THINK_TEMPLATE)
    return store


def start_server(store: Store) -> tuple[Running, uvicorn.Server, threading.Thread]:
    """Run the app with uvicorn in a thread on a free loopback port."""
    app = create_app(store)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="offload-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    return Running(f"http://127.0.0.1:{port}", app, store), server, thread


@pytest.fixture(scope="session")
def offload_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """OFFLOAD_HOME in a temporary folder for the whole session (no Ollama store is read)."""
    home = tmp_path_factory.mktemp("offload-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("OFFLOAD_HOME", str(home))
    mp.setenv("OLLAMA_MODELS", str(home / "no-ollama"))
    mp.delenv("OFFLOAD_MODELS", raising=False)
    yield home
    mp.undo()


@pytest.fixture(scope="session")
def store(offload_home: Path) -> Store:
    """The session's store with the test models."""
    return make_store(offload_home)


@pytest.fixture(scope="session")
def server(store: Store) -> Iterator[Running]:
    """The shared real server."""
    running, srv, thread = start_server(store)
    yield running
    srv.should_exit = True
    thread.join(timeout=10)
    running.scheduler.close()
