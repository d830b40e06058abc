"""Log probabilities through the Ollama and OpenAI APIs, from the model's own distribution."""

from __future__ import annotations

import math

import httpx
import pytest

from tests.conftest import ServerThread


@pytest.fixture(scope="module")
def http(server: ServerThread) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_generate_returns_a_logprob_per_token_with_ranked_alternatives(http: httpx.Client) -> None:
    r = http.post(
        "/api/generate",
        json={
            "model": "gemma3:270m",
            "prompt": "Paris is the capital of",
            "raw": True,
            "stream": False,
            "logprobs": True,
            "top_logprobs": 3,
            "options": {"temperature": 0, "num_predict": 4},
        },
    )
    body = r.json()
    lps = body["logprobs"]
    assert len(lps) == body["eval_count"] == 4
    assert "".join(t["token"] for t in lps) == body["response"]
    for t in lps:
        assert t["logprob"] <= 0
        alts = t["top_logprobs"]
        assert len(alts) == 3
        assert [a["logprob"] for a in alts] == sorted((a["logprob"] for a in alts), reverse=True)
        # Greedy decoding picks the likeliest token: it heads the alternatives.
        assert alts[0]["token"] == t["token"] and math.isclose(alts[0]["logprob"], t["logprob"])
        assert bytes(t["bytes"]).decode() == t["token"]


def test_logprobs_are_absent_unless_asked(http: httpx.Client) -> None:
    r = http.post(
        "/api/generate",
        json={
            "model": "gemma3:270m",
            "prompt": "Hi",
            "raw": True,
            "stream": False,
            "options": {"num_predict": 2},
        },
    )
    assert "logprobs" not in r.json() or r.json()["logprobs"] is None


def test_openai_chat_logprobs_through_the_official_client(server: ServerThread) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="offload")
    out = client.chat.completions.create(
        model="gemma3:270m",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_top_logprobs_out_of_range_is_400(http: httpx.Client) -> None:
    r = http.post(
        "/api/generate",
        json={"model": "gemma3:270m", "prompt": "Hi", "logprobs": True, "top_logprobs": 99},
    )
    assert r.status_code == 400 and "top_logprobs" in r.json()["error"]
