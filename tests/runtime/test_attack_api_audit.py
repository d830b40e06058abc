"""Hostile or sloppy clients against a real server: work nobody waits for stops, odd values in
fields the server keeps do not break later answers, and bad bodies get one-line errors."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.runtime.conftest import MODEL, Running


@pytest.fixture(scope="module")
def http(server: Running) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _generate_once(url: str) -> float:
    """Seconds a one-token generation takes to answer (failing past 60 s)."""
    t0 = time.monotonic()
    r = httpx.post(
        f"{url}/api/generate",
        json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 1}},
        timeout=60,
    )
    assert r.status_code == 200, r.text[:300]
    return time.monotonic() - t0


@pytest.mark.parametrize("path", ["/api/embed", "/v1/embeddings"])
def test_an_embedding_whose_client_hangs_up_stops_and_frees_the_model(
    http: httpx.Client, path: str
) -> None:
    """The runner embedded a whole list in one go, whatever the client did: 2,048 long inputs
    held the model (and a CPU) for hours after the client had gone, and every generation on it
    waited for them."""
    assert http.post(path, json={"model": MODEL, "input": "warm up"}).status_code == 200
    inputs = ["hello world " * 200] * 2048
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{http.base_url}{path}", json={"model": MODEL, "input": inputs}, timeout=1.5)
    assert _generate_once(str(http.base_url)) < 20
    # A list the client waits for is still embedded whole.
    r = http.post(path, json={"model": MODEL, "input": ["one", "two", "three"]})
    assert r.status_code == 200
    body = r.json()
    assert len(body.get("embeddings") or body.get("data")) == 3


@pytest.mark.parametrize("keep_alive", [1e300, "99999999999999h", 10**20])
def test_a_keep_alive_too_long_for_a_date_is_forever_and_ps_still_answers(
    http: httpx.Client, keep_alive: object
) -> None:
    """/api/ps wrote the expiry as a date: a keep_alive of 1e300 seconds made every /api/ps a 500
    ("timestamp out of range") for as long as the model stayed loaded, which was forever."""
    body = {"model": MODEL, "prompt": "hi", "stream": False, "keep_alive": keep_alive}
    r = http.post("/api/generate", json={**body, "options": {"num_predict": 1}})
    assert r.status_code == 200, r.text[:300]
    r = http.get("/api/ps")
    assert r.status_code == 200, r.text[:300]
    (entry,) = [m for m in r.json()["models"] if m["name"] == MODEL]
    assert entry["expires_at"].startswith("2100-01-01")
    # Back to the default, so later tests see an ordinary expiry.
    r = http.post("/api/generate", json={"model": MODEL, "prompt": "", "keep_alive": "5m"})
    assert r.status_code == 200
