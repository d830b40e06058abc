"""Eight official clients at once, each with its own options, batched by one runner: every answer
is complete, honours its own options, and no token crosses into another stream."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from offload.models.store import Store
from tests.runtime.conftest import MODEL, TOOLS_MODEL, Running, start_server


@pytest.fixture(scope="module")
def batching_server(store: Store) -> Iterator[Running]:
    mp = pytest.MonkeyPatch()
    mp.setenv("OFFLOAD_NUM_PARALLEL", "8")
    running, srv, thread = start_server(store)
    yield running
    srv.should_exit = True
    thread.join(timeout=10)
    running.scheduler.close()
    mp.undo()


def _schema(word: str) -> dict[str, Any]:
    return {"type": "object", "properties": {"word": {"const": word}}, "required": ["word"]}


def test_eight_streaming_clients_with_their_own_options_get_separate_complete_answers(
    batching_server: Running,
) -> None:
    url = batching_server.url
    oc = ollama.Client(host=url, timeout=600)
    ai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600)
    # Warm both models so that the eight requests start together.
    oc.generate(model=MODEL, prompt="Hi", options={"num_predict": 1})
    oc.generate(model=TOOLS_MODEL, prompt="Hi", options={"num_predict": 1})
    runner = next(r for r in batching_server.scheduler.loaded() if r.name == MODEL)
    runner.proc.call("stats", "testing")  # clears the runner's record of steps
    results: dict[str, Any] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def ollama_chat_schema(word: str) -> Callable[[], Any]:
        def run() -> Any:
            text, final = "", None
            for c in oc.chat(
                model=MODEL,
                messages=[{"role": "user", "content": "Give me a word as JSON."}],
                format=_schema(word),
                stream=True,
                options={"temperature": 0.8, "seed": 5},
            ):
                text += c.message.content or ""
                final = c
            return text, final

        return run

    def ollama_stop() -> Any:
        text, final = "", None
        for c in oc.generate(
            model=MODEL,
            prompt="One, two, three, four,",
            raw=True,
            stream=True,
            options={"temperature": 0, "num_predict": 12, "stop": ["six"]},
        ):
            text += c.response
            final = c
        return text, final

    def ollama_num_predict() -> Any:
        final = None
        for c in oc.generate(
            model=MODEL, prompt="Tell me about the sea", stream=True, options={"num_predict": 5}
        ):
            final = c
        return final

    def ollama_seeded() -> Any:
        text, final = "", None
        for c in oc.generate(
            model=MODEL,
            prompt="My favourite food is",
            stream=True,
            options={"temperature": 0.8, "seed": 42, "num_predict": 24},
        ):
            text += c.response
            final = c
        return text, final

    def openai_schema(word: str) -> Callable[[], Any]:
        def run() -> Any:
            fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": _schema(word)}}
            text, finish = "", None
            for ch in ai.chat.completions.create(
                model=MODEL,
                stream=True,
                response_format=fmt,  # type: ignore[call-overload]
                messages=[{"role": "user", "content": "A word as JSON"}],
            ):
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                    finish = ch.choices[0].finish_reason or finish
            return text, finish

        return run

    def openai_tools() -> Any:
        tools = [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather in a city",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "enum": ["Oslo"]}},
                        "required": ["city"],
                    },
                },
            }
        ]
        calls, finish = [], None
        for ch in ai.chat.completions.create(
            model=TOOLS_MODEL,
            stream=True,
            tools=tools,  # type: ignore[arg-type]
            tool_choice="required",
            messages=[{"role": "user", "content": "Weather in Oslo?"}],
        ):
            if ch.choices:
                calls += ch.choices[0].delta.tool_calls or []
                finish = ch.choices[0].finish_reason or finish
        return calls, finish

    jobs: dict[str, Callable[[], Any]] = {
        "alpha": ollama_chat_schema("alpha"),
        "bravo": ollama_chat_schema("bravo"),
        "stop": ollama_stop,
        "five": ollama_num_predict,
        "seeded": ollama_seeded,
        "charlie": openai_schema("charlie"),
        "delta": openai_schema("delta"),
        "tools": openai_tools,
    }

    def worker(name: str, fn: Callable[[], Any]) -> None:
        start.wait()
        try:
            results[name] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    # Answers forced by grammar: a token that crossed streams would break its JSON or its word.
    for word in ("alpha", "bravo"):
        text, final = results[word]
        assert json.loads(text) == {"word": word} and final.done
    for word in ("charlie", "delta"):
        text, finish = results[word]
        assert json.loads(text) == {"word": word} and finish == "stop"
    text, final = results["stop"]
    assert "six" not in text and final.done_reason == "stop" and text.strip()
    assert results["five"].eval_count == 5 and results["five"].done_reason == "length"
    text, final = results["seeded"]
    assert final.done and final.eval_count > 0 and text
    calls, finish = results["tools"]
    assert finish == "tool_calls" and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}
    # They really ran as one batch: steps of the runner decoded six or seven streams at once.
    ps = httpx.get(f"{url}/api/ps", timeout=10).json()["models"]
    assert next(m for m in ps if m["name"] == MODEL)["parallel"] == 8
    steps = runner.proc.call("stats", "testing")["steps"]
    assert max(decoding for decoding, _, _ in steps) >= 6
