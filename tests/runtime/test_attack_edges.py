"""Hostile input that used to reach code unable to handle it: a 400/413 at the edge, never a 500,
and a connection that stays usable after any answer."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import ServerThread
from tests.runtime.steady import assert_one_line_error

GEN = {"model": "gemma3:270m", "stream": False, "options": {"num_predict": 2}}


@pytest.fixture(scope="module")
def http(server: ServerThread) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/generate", '{"model":"gemma3:270m","prompt":"\\ud800","stream":false}'),
        ("/api/show", '{"model":"\\udfff"}'),
        ("/api/chat", '{"model":"gemma3:270m","messages":[{"role":"user","content":"a\\ud83d"}]}'),
        ("/v1/chat/completions", '{"model":"x\\ud800","messages":[]}'),
        ("/v1/messages", '{"model":"m","max_tokens":1,"messages":[],"system":"\\udc00"}'),
        ("/api/embed", '{"model":"gemma3:270m","input":["ok","\\ud800"]}'),
    ],
)
def test_a_lone_surrogate_in_any_string_is_a_400(http: httpx.Client, path: str, body: str) -> None:
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert "lone UTF-16 surrogate" in assert_one_line_error(r, 400)


def test_a_surrogate_sent_as_raw_bytes_is_a_400_too(http: httpx.Client) -> None:
    body = b'{"model":"gemma3:270m","messages":[{"role":"user","content":"\xed\xa0\x80"}]}'
    r = http.post("/api/chat", content=body)
    assert "lone UTF-16 surrogate" in assert_one_line_error(r, 400)


def test_a_surrogate_pair_is_one_character_and_works(http: httpx.Client) -> None:
    # \ud83d\ude00 is one emoji: JSON's way of writing a character beyond the BMP.
    body = '{"model":"gemma3:270m","prompt":"hi \\ud83d\\ude00","stream":false,"options":{"num_predict":1}}'
    r = http.post("/api/generate", content=body)
    assert r.status_code == 200, r.text


def test_a_json_body_over_the_cap_is_a_413_before_it_is_parsed(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offload.runtime.server import app as app_mod

    monkeypatch.setattr(app_mod, "MAX_JSON_BODY", 1 << 20)
    r = http.post("/api/generate", content=b'{"prompt":"' + b"x" * (2 << 20) + b'"}')
    assert "larger than 1 MiB" in assert_one_line_error(r, 413)


@pytest.mark.parametrize("options", [{"num_batch": 1}, {"num_batch": 3}, {"num_ctx": 1}])
def test_tiny_batches_and_contexts_run_instead_of_aborting_llama_cpp(
    http: httpx.Client, options: dict
) -> None:
    """llama.cpp asserts when a batch cannot hold a token of every sequence; the executor gives
    the context room for them whatever the options say."""
    r = http.post(
        "/api/generate", json={**GEN, "prompt": "hi", "options": {**options, "num_predict": 2}}
    )
    assert r.status_code == 200, r.text[:300]
    assert r.json()["done"] is True


def test_a_format_schema_too_large_for_a_grammar_is_refused(http: httpx.Client) -> None:
    big = {"enum": list(range(5000))}
    r = http.post("/api/generate", json={**GEN, "prompt": "Pick:", "format": big})
    assert "too large for a grammar" in assert_one_line_error(r, 400)
    branches = {"anyOf": [{"const": i} for i in range(2000)]}
    r = http.post("/api/generate", json={**GEN, "prompt": "Pick:", "format": branches})
    assert "too large for a grammar" in assert_one_line_error(r, 400)
    # An ordinary enum still constrains the answer.
    r = http.post(
        "/api/generate",
        json={
            **GEN,
            "prompt": "Pick:",
            "format": {"enum": ["yes", "no"]},
            "options": {"num_predict": 4},
        },
    )
    assert r.status_code == 200 and r.json()["response"].strip('"') in ("yes", "no")


def test_embed_takes_at_most_2048_inputs(http: httpx.Client) -> None:
    r = http.post("/api/embed", json={"model": "gemma3:270m", "input": ["x"] * 2049})
    assert "2048" in assert_one_line_error(r, 400)


def test_405_names_every_method_of_the_path(http: httpx.Client) -> None:
    for path in ("/api/tags", "/api/version"):
        r = http.post(path, json={})
        assert r.status_code == 405
        assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}, path


def test_a_bug_is_a_500_in_the_api_shape_and_the_connection_stays_usable(
    offload_home: Path,
) -> None:
    """Starlette's last-resort handler answered and then raised again, so the server dropped the
    connection without a word, and a keep-alive client's next request failed."""
    from offload.runtime.server.app import create_app

    app = create_app()

    @app.post("/api/boom")
    async def boom() -> None:
        raise RuntimeError("a bug\n  on two lines")

    request = (
        b"POST /api/boom HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    version = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    try:
        with ServerThread(app) as s, socket.create_connection(("127.0.0.1", s.port), 10) as c:
            c.sendall(request)
            first = _read_response(c)
            assert (
                first.startswith(b"HTTP/1.1 500")
                and b'"error":"internal error: a bug on two lines"' in first
            )
            c.sendall(version)  # the same connection, as httpx and the official clients reuse it
            assert _read_response(c).startswith(b"HTTP/1.1 200")
    finally:
        app.state.scheduler.close()


def _read_response(c: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = c.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


_NAME_FIELDS = [
    ("POST", "/api/generate", {"prompt": "hi", "stream": False}, "model"),
    ("POST", "/api/chat", {"messages": [], "stream": False}, "model"),
    ("POST", "/api/embed", {"input": "hi"}, "model"),
    ("POST", "/api/embeddings", {"prompt": "hi"}, "model"),
    ("POST", "/api/show", {}, "model"),
    ("POST", "/api/show", {}, "name"),
    ("DELETE", "/api/delete", {}, "model"),
    ("POST", "/api/copy", {"destination": "copied:latest"}, "source"),
    ("POST", "/api/copy", {"source": "gemma3:270m"}, "destination"),
    ("POST", "/api/create", {"from": "gemma3:270m", "stream": False}, "model"),
    ("POST", "/api/create", {"model": "created:latest", "stream": False}, "from"),
    ("POST", "/api/pull", {"stream": False}, "model"),
    ("POST", "/api/push", {"stream": False}, "model"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}, "model"),
    ("POST", "/v1/embeddings", {"input": "hi"}, "model"),
    ("POST", "/v1/messages", {"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 1}, "model"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("gemma3:270m\n", "control character (U+000A)"),
        ("gemma3:270m\r\n", "control character (U+000D)"),
        ("gemma3\t:270m", "control character (U+0009)"),
        ("gemma3:270m\x00", "control character (U+0000)"),
        ("gemma3:270m\x7f", "control character (U+007F)"),
        ("gemma3:270m\x85", "control character (U+0085)"),
        (" gemma3:270m", "whitespace"),
        ("gemma3:270m ", "whitespace"),
        ("gemma3:270m\u3000", "whitespace"),
    ],
)
def test_a_model_name_with_a_control_character_or_outer_space_is_a_400_on_every_route(
    http: httpx.Client, name: str, problem: str
) -> None:
    """A name ending in a newline was read as the name without it (names were stripped)."""
    for method, path, body, field in _NAME_FIELDS:
        model = {} if field == "name" else {"model": "gemma3:270m"}
        r = http.request(method, path, json={**model, **body, field: name})
        message = assert_one_line_error(r, 400, "invalid model name", problem)
        assert "\n" not in message and "\t" not in message, (path, field)
    r = http.get(f"/v1/models/{quote(name)}")
    assert_one_line_error(r, 400, "invalid model name", problem)
    # Nothing was written under the name.
    names = {m["name"] for m in http.get("/api/tags").json()["models"]}
    assert not names & {"copied:latest", "created:latest"}


_CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/embed", {"input": "hi", "dimensions": True}, "dimensions"),
        ("/v1/embeddings", {"input": "hi", "dimensions": True}, "dimensions"),
        ("/v1/embeddings", {"input": [True, False]}, "input"),
        ("/v1/embeddings", {"input": [[2, True]]}, "input"),
        ("/api/embed", {"input": "hi", "keep_alive": True}, "keep_alive"),
        ("/api/generate", {"prompt": "hi", "context": [2, True]}, "context.1"),
        ("/api/generate", {"prompt": "hi", "logprobs": True, "top_logprobs": True}, "top_logprobs"),
        ("/api/chat", {**_CHAT, "logprobs": True, "top_logprobs": False}, "top_logprobs"),
        ("/api/generate", {"prompt": "hi", "options": {"num_ctx": True}}, "num_ctx"),
        ("/api/embed", {"input": "hi", "options": {"num_batch": False}}, "num_batch"),
        ("/v1/chat/completions", {**_CHAT, "max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", {**_CHAT, "n": True}, "n"),
        ("/v1/chat/completions", {**_CHAT, "seed": False}, "seed"),
        ("/v1/chat/completions", {**_CHAT, "temperature": True}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
        ("/v1/messages", {**_CHAT, "max_tokens": True}, "max_tokens"),
        ("/v1/messages", {**_CHAT, "max_tokens": 1, "top_k": True}, "top_k"),
        ("/v1/responses", {"input": "hi", "max_output_tokens": True}, "max_output_tokens"),
    ],
)  # fmt: skip
def test_a_boolean_in_a_number_field_is_a_400_not_read_as_1(
    http: httpx.Client, path: str, body: dict, field: str
) -> None:
    """Python's True is an int: "dimensions": true was read as one dimension."""
    r = http.post(path, json={"model": "gemma3:270m", "stream": False, **body})
    message = assert_one_line_error(r, 400, field)
    assert "boolean" in message or "got True" in message or "got False" in message


def test_whole_numbers_still_work_where_booleans_are_refused(http: httpx.Client) -> None:
    r = http.post("/api/embed", json={"model": "gemma3:270m", "input": "hi", "dimensions": 2})
    assert r.status_code == 200 and len(r.json()["embeddings"][0]) == 2
    r = http.post("/v1/embeddings", json={"model": "gemma3:270m", "input": "hi", "dimensions": 3})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 3
    r = http.post("/v1/embeddings", json={"model": "gemma3:270m", "input": [2, 3]})
    assert r.status_code == 200, r.text
    r = http.post(
        "/v1/chat/completions",
        json={"model": "gemma3:270m", **_CHAT, "max_tokens": 1, "temperature": 0, "seed": 1},
    )
    assert r.status_code == 200, r.text
