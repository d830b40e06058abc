"""Each API family answers in its own shape: unknown routes and methods, and what a model can do."""

from __future__ import annotations

import httpx
import pytest

from offload.models.capabilities import capabilities
from tests.runtime.conftest import MODEL, THINK_MODEL, TOOLS_MODEL, Running


@pytest.mark.parametrize(
    ("method", "path", "headers", "family"),
    [
        ("POST", "/v1/nope", {}, "openai"),
        ("GET", "/v1/chat/nothing", {}, "openai"),
        ("POST", "/v1/messages/nope", {}, "anthropic"),
        ("POST", "/v1/complete", {}, "anthropic"),
        ("GET", "/v1/organizations/me", {"anthropic-version": "2023-06-01"}, "anthropic"),
        ("GET", "/api/nope", {}, "ollama"),
        ("GET", "/nowhere", {}, "ollama"),
    ],
)
def test_unknown_routes_answer_404_naming_the_path_in_their_family_shape(
    server: Running, method: str, path: str, headers: dict, family: str
) -> None:
    r = httpx.request(method, f"{server.url}{path}", headers=headers, timeout=10)
    body = r.json()
    assert r.status_code == 404
    if family == "openai":
        assert body["error"]["code"] is None and body["error"]["type"] == "invalid_request_error"
        message = body["error"]["message"]
    elif family == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
        message = body["error"]["message"]
    else:
        message = body["error"]
    assert path in message


@pytest.mark.parametrize(
    ("path", "family"),
    [
        ("/v1/messages", "anthropic"),
        ("/v1/responses", "openai"),
        ("/v1/chat/completions", "openai"),
        ("/api/chat", "ollama"),
    ],
)
def test_a_wrong_method_answers_405_in_the_family_shape(
    server: Running, path: str, family: str
) -> None:
    r = httpx.get(f"{server.url}{path}", timeout=10)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    body = r.json()
    if family == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    elif family == "openai":
        assert body["error"]["code"] is None and "GET" in body["error"]["message"]
    else:
        assert path in body["error"]


def test_show_reports_capabilities_from_the_template(server: Running) -> None:
    def caps(name: str) -> list[str]:
        r = httpx.post(f"{server.url}/api/show", json={"model": name}, timeout=30)
        return r.json()["capabilities"]

    assert caps(MODEL) == ["completion"]  # its template renders neither tools nor thinking
    assert caps(TOOLS_MODEL) == ["completion", "tools"]
    assert caps(THINK_MODEL) == ["completion", "thinking"]


def test_capabilities_follow_the_gguf_and_the_template() -> None:
    gemma = {"general.architecture": "gemma3"}
    assert capabilities("{{ .Prompt }}{{ .Suffix }}", gemma) == ["completion", "insert"]
    assert capabilities(None, gemma, has_projector=True) == ["completion", "vision"]
    assert capabilities(None, {"general.architecture": "qwen3", "qwen3.pooling_type": 3}) == [
        "embedding"
    ]
    assert capabilities("{{ .Tools }}", {"general.architecture": "nomic-bert"}) == ["embedding"]
    jinja = "{% for t in tools %}{{ t }}{% endfor %}"
    assert capabilities(jinja, gemma) == ["completion", "tools"]
