"""The real server over HTTP: generate and chat, streamed and not, with Ollama's fields."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import ServerThread

OPTS = {"temperature": 0, "seed": 3, "num_predict": 8}


@pytest.fixture(scope="module")
def http(server: ServerThread) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def ndjson(r: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def test_root_says_it_is_running(http: httpx.Client) -> None:
    r = http.get("/")
    assert r.status_code == 200 and "running" in r.text


def test_version_and_tags_list_the_embedded_model(http: httpx.Client) -> None:
    assert http.get("/api/version").json()["version"]
    names = [m["name"] for m in http.get("/api/tags").json()["models"]]
    assert "gemma3:270m" in names


def test_generate_streams_ndjson_pieces_then_a_summary(http: httpx.Client) -> None:
    r = http.post(
        "/api/generate",
        json={
            "model": "gemma3:270m",
            "prompt": "Paris is the capital of",
            "raw": True,
            "options": OPTS,
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    chunks = ndjson(r)
    assert len(chunks) >= 3
    assert all(c["done"] is False for c in chunks[:-1])
    final = chunks[-1]
    assert final["done"] is True and final["done_reason"] == "length"
    text = "".join(c["response"] for c in chunks)
    assert "France" in text
    assert final["eval_count"] == 8
    for k in (
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_duration",
    ):
        assert isinstance(final[k], int), k
    assert final["prompt_eval_count"] > 0 and final["eval_duration"] > 0
    assert final["total_duration"] >= final["eval_duration"] + final["prompt_eval_duration"]


def test_generate_without_streaming_returns_one_object_with_the_same_text(
    http: httpx.Client,
) -> None:
    body = {
        "model": "gemma3:270m",
        "prompt": "Paris is the capital of",
        "raw": True,
        "options": OPTS,
    }
    streamed = "".join(c["response"] for c in ndjson(http.post("/api/generate", json=body)))
    r = http.post("/api/generate", json={**body, "stream": False})
    one = r.json()
    assert one["done"] is True and one["response"] == streamed
    assert one["model"] == "gemma3:270m" and one["created_at"].endswith("Z")


def test_chat_applies_the_template_and_streams_messages(http: httpx.Client) -> None:
    body = {
        "model": "gemma3:270m",
        "messages": [{"role": "user", "content": "Say hello."}],
        "options": OPTS,
    }
    chunks = ndjson(http.post("/api/chat", json=body))
    assert chunks[-1]["done"] is True
    assert all(c["message"]["role"] == "assistant" for c in chunks)
    streamed = "".join(c["message"]["content"] for c in chunks)
    one = http.post("/api/chat", json={**body, "stream": False}).json()
    assert one["message"]["content"] == streamed
    # The Modelfile's template wraps the turn: the prompt is longer than the bare words (the first
    # request computes the turn; the second finds it in the runner's cache).
    assert chunks[-1]["prompt_eval_count"] > len("Say hello.".split()) + 4
    assert one["prompt_eval_count"] < chunks[-1]["prompt_eval_count"]


def test_stop_option_cuts_the_answer(http: httpx.Client) -> None:
    body = {
        "model": "gemma3:270m",
        "prompt": "One, two, three, four,",
        "raw": True,
        "stream": False,
        "options": {**OPTS, "num_predict": 12},
    }
    free = http.post("/api/generate", json=body).json()["response"]
    assert "six" in free
    body["options"]["stop"] = ["six"]
    cut = http.post("/api/generate", json=body).json()
    assert cut["response"] == free[: free.index("six")] and cut["done_reason"] == "stop"


def test_unknown_model_is_404_with_a_hint(http: httpx.Client) -> None:
    r = http.post("/api/generate", json={"model": "nosuchmodel", "prompt": "hi"})
    assert r.status_code == 404
    assert r.json() == {"error": 'model "nosuchmodel" not found, try "offload pull nosuchmodel"'}


def test_malformed_json_is_400_with_the_parser_message(http: httpx.Client) -> None:
    r = http.post(
        "/api/chat",
        content=b'{"model": "gemma3:270m", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert "invalid JSON" in r.json()["error"]


def test_bad_option_type_is_400(http: httpx.Client) -> None:
    r = http.post(
        "/api/generate", json={"model": "gemma3:270m", "prompt": "hi", "options": {"top_k": "many"}}
    )
    assert r.status_code == 400 and "top_k" in r.json()["error"]


def test_a_json_body_sent_as_form_data_is_read_as_json_like_curl_d(http: httpx.Client) -> None:
    # `curl URL -d '{...}'`, as Ollama's docs call the API, labels the body as form data.
    body = json.dumps(
        {
            "model": "gemma3:270m",
            "prompt": "Hi",
            "raw": True,
            "stream": False,
            "options": {"num_predict": 2},
        }
    )
    r = http.post(
        "/api/generate", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 200 and r.json()["eval_count"] == 2
