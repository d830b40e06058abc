"""What a client sees of a freshly installed ``offload serve``: the embedded model is offered before
its first use, Ollama's HEAD probes answer, the license is text, a queued stream can be cancelled
while it waits, and the scheduler's events reach the server's log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve_process import ServeProcess

MODEL = "gemma3:270m"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A server over an empty store, one request per model at a time (so a second one queues)."""
    with ServeProcess(
        tmp_path_factory.mktemp("fresh-home"), env={"OFFLOAD_NUM_PARALLEL": "1"}
    ) as s:
        yield s


def test_a_fresh_store_lists_the_embedded_model(fresh: ServeProcess) -> None:
    tags = httpx.get(f"{fresh.url}/api/tags", timeout=120).json()["models"]
    assert [m["name"] for m in tags] == [MODEL]
    assert tags[0]["details"]["family"] == "gemma3"
    models = httpx.get(f"{fresh.url}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == [MODEL]
    assert httpx.get(f"{fresh.url}/v1/models/{MODEL}", timeout=30).status_code == 200


def test_offload_list_on_a_fresh_store_shows_it_and_rm_is_respected(tmp_path: Path) -> None:
    env = {**os.environ, "OFFLOAD_HOME": str(tmp_path), "OLLAMA_MODELS": str(tmp_path / "none")}
    env.pop("OFFLOAD_MODELS", None)

    def offload(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "offload.runtime.cli", *args], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert MODEL in offload("list")
    offload("rm", MODEL)
    assert MODEL not in offload("list"), "a removed embedded model came back by itself"


@pytest.mark.parametrize("path", ["/api/version", "/api/tags", "/"])
def test_head_probes_answer_like_ollama(fresh: ServeProcess, path: str) -> None:
    r = httpx.head(f"{fresh.url}{path}", timeout=60)
    assert r.status_code == 200
    assert r.content == b""


def test_the_embedded_license_is_plain_text(fresh: ServeProcess) -> None:
    show = httpx.post(f"{fresh.url}/api/show", json={"model": MODEL}, timeout=120).json()
    license_text = show["license"]
    assert license_text.startswith("Gemma Terms of Use")
    assert "<" not in license_text and "doctype" not in license_text.lower()
    assert "Section 1: DEFINITIONS" in license_text
    assert len(license_text) < 20_000


def test_a_queued_stream_gets_its_headers_and_can_be_cancelled_while_it_waits(
    fresh: ServeProcess,
) -> None:
    busy_done = threading.Event()
    busy_chunks: list[dict] = []

    def busy() -> None:
        body = {"model": MODEL, "prompt": "Count from one to five hundred in words.",
                "options": {"num_predict": 300, "temperature": 0, "seed": 1}}  # fmt: skip
        with httpx.stream("POST", f"{fresh.url}/api/generate", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line:
                    busy_chunks.append(json.loads(line))
        busy_done.set()

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while not busy_chunks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy_chunks, "the first request never started"

    queued = {"model": MODEL, "prompt": "Say hi.", "options": {"num_predict": 5}}
    t0 = time.monotonic()
    with httpx.stream("POST", f"{fresh.url}/api/generate", json=queued, timeout=300) as r:
        waited = time.monotonic() - t0
        assert r.status_code == 200
        assert not busy_done.is_set(), "the first request ended before the second was answered"
        assert r.headers["content-type"].startswith("application/x-ndjson")
    # Closed before its first token: the cancelled request must not hold up the model.
    assert waited < 5, f"headers took {waited:.1f} s while the request was queued"
    t.join(300)
    assert busy_chunks[-1]["done"] is True
    after = httpx.post(f"{fresh.url}/api/generate", timeout=120,
                       json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})  # fmt: skip
    assert after.status_code == 200


def test_scheduler_events_reach_the_server_log(fresh: ServeProcess) -> None:
    r = httpx.post(f"{fresh.url}/api/generate", timeout=120,
                   json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 1}})  # fmt: skip
    assert r.status_code == 200
    log = fresh.log.read_text(errors="replace")
    assert "INFO offload.runtime.serving.scheduler: load {" in log, log[-2000:]
    assert "probe failed" not in log, log[-2000:]


def test_ps_lists_a_model_once_after_embeddings_and_generation(fresh: ServeProcess) -> None:
    e = httpx.post(
        f"{fresh.url}/api/embed", json={"model": MODEL, "input": ["a", "b"]}, timeout=120
    )
    assert e.status_code == 200 and len(e.json()["embeddings"]) == 2
    g = httpx.post(f"{fresh.url}/api/generate", timeout=120,
                   json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 1}})  # fmt: skip
    assert g.status_code == 200
    names = [m["name"] for m in httpx.get(f"{fresh.url}/api/ps", timeout=30).json()["models"]]
    assert names == [MODEL]


def test_listings_that_arrive_together_import_the_embedded_model_once(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from offload.models.store import Store
    from offload.runtime.serving.planning import list_models

    store = Store(tmp_path / "models")
    with ThreadPoolExecutor(4) as pool:
        listings = list(pool.map(lambda _: list_models(store), range(4)))
    assert all([m.name.display for m in listed] == [MODEL] for listed in listings)
    blobs = [p for p in (tmp_path / "models" / "blobs").iterdir() if p.stat().st_size > 100 << 20]
    assert len(blobs) == 1
    assert not [p for p in (tmp_path / "models").rglob(".tmp-*")]
