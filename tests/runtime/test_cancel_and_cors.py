"""A client that goes away stops its generation; browsers are let in from local origins only."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from offload.models.store import Store
from offload.runtime import config
from offload.runtime.server.app import create_app
from tests.runtime.conftest import MODEL, Running


def test_disconnect_mid_stream_cancels_and_frees_the_model(server: Running) -> None:
    body = {"model": MODEL, "prompt": "Write a very long story.", "options": {"num_predict": 4000}}
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", f"{server.url}/api/generate", json=body) as r,
    ):
        lines = r.iter_lines()
        next(lines), next(lines)
        runner = next(x for x in server.scheduler.loaded() if x.name == MODEL)
    # The connection is closed here; the engine sees the cancel at its next token.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
        runner.last_stats and runner.last_stats.done_reason == "cancel"
    ):
        time.sleep(0.05)
    assert runner.last_stats.done_reason == "cancel"
    assert runner.last_stats.eval_count < 100
    t0 = time.monotonic()
    r2 = httpx.post(
        f"{server.url}/api/generate",
        timeout=60,
        json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 3}},
    )
    assert r2.status_code == 200 and r2.json()["done_reason"] in ("stop", "length")
    assert time.monotonic() - t0 < 15


@pytest.fixture()
def bare_app(tmp_path, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("OFFLOAD_ORIGINS", "https://*.example.com")
    return TestClient(create_app(Store(tmp_path / "models")), base_url="http://127.0.0.1")


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost:3000",
        "https://127.0.0.1",
        "http://0.0.0.0:8080",
        "app://obsidian.md",
        "tauri://localhost",
        "file://",
        "https://ui.example.com",
    ],
)
def test_local_and_configured_origins_are_allowed(bare_app: TestClient, origin: str) -> None:
    r = bare_app.options(
        "/api/tags", headers={"Origin": origin, "Access-Control-Request-Method": "GET"}
    )
    assert r.headers.get("access-control-allow-origin") == origin


@pytest.mark.parametrize(
    "origin", ["https://evil.com", "http://localhost.evil.com", "https://example.com.evil"]
)
def test_other_origins_are_refused(bare_app: TestClient, origin: str) -> None:
    r = bare_app.get("/api/tags", headers={"Origin": origin})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


def test_binds_to_loopback_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OFFLOAD_HOST", raising=False)
    assert config.host().host == "127.0.0.1"
    monkeypatch.setenv("OFFLOAD_HOST", "0.0.0.0:9999")
    assert (config.host().host, config.host().port) == ("0.0.0.0", 9999)


def test_hanging_up_on_a_non_streamed_request_cancels_it_too(server: Running) -> None:
    body = {
        "model": MODEL,
        "prompt": "Write a very long story.",
        "stream": False,
        # Greedy, so the answer is the same every time: this one runs to num_predict, far longer
        # than the client waits (a sampled one may end early and make the test pass vacuously).
        "options": {"num_predict": 4000, "temperature": 0, "seed": 1},
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/api/chat",
            json={**body, "messages": [{"role": "user", "content": "story"}]},
            timeout=httpx.Timeout(10, read=1.5),
        )
    runner = next(x for x in server.scheduler.loaded() if x.name == MODEL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
        runner.last_stats and runner.last_stats.done_reason == "cancel"
    ):
        time.sleep(0.05)
    assert runner.last_stats.done_reason == "cancel" and runner.last_stats.eval_count < 1000
