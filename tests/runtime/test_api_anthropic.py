"""Anthropic's Messages API through the official ``anthropic`` client, against the real server.

Sampling fields go in ``extra_body``: recent SDKs no longer take them as arguments, the API does.
Raw answers are also validated against the SDK's pydantic types with ``model_validate``.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from tests.runtime.conftest import MODEL, THINK_MODEL, TOOLS_MODEL, Running
from tests.runtime.sse_events import post_events

GREEDY = {"temperature": 0}
LOOKUP = {
    "name": "lookup",
    "description": "Look something up",
    "input_schema": {
        "type": "object",
        "properties": {"q": {"type": "string", "enum": ["cats", "dogs"]}},
        "required": ["q"],
    },
}


@pytest.fixture()
def client(server: Running) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def _ollama_chat(server: Running, content: str, options: dict) -> dict:
    return httpx.post(
        f"{server.url}/api/chat",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "options": options,
            "stream": False,
        },
        timeout=120,
    ).json()


def test_plain_answer_has_text_stop_reason_and_usage_equal_to_ollama_counts(
    server: Running, client: anthropic.Anthropic
) -> None:
    m = client.messages.create(
        model=MODEL,
        max_tokens=8,
        messages=[{"role": "user", "content": "Say hello"}],
        extra_body=GREEDY,
    )
    assert m.type == "message" and m.role == "assistant" and m.content[0].type == "text"
    ollama = _ollama_chat(server, "Say hello", {"temperature": 0, "num_predict": 8})
    assert m.content[0].text == ollama["message"]["content"]
    # The same prompt in tokens (Anthropic counts the part read from a cache apart, as Ollama's
    # prompt_eval_count leaves it out); the same answer.
    assert (m.usage.input_tokens + m.usage.cache_read_input_tokens, m.usage.output_tokens) == (
        ollama["prompt_eval_count"] + ollama["prompt_cached_count"],
        ollama["eval_count"],
    )
    assert m.stop_reason == ("max_tokens" if ollama["done_reason"] == "length" else "end_turn")
    raw = httpx.post(
        f"{server.url}/v1/messages",
        json={
            "model": MODEL,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "Say hello"}],
        },
        timeout=120,
    ).json()
    Message.model_validate(raw)


def test_max_tokens_ends_it_with_its_stop_reason(client: anthropic.Anthropic) -> None:
    m = client.messages.create(
        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "Tell a long story"}]
    )
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3


def test_stop_sequence_ends_it_and_is_named(server: Running, client: anthropic.Anthropic) -> None:
    # What the model says at temperature 0, then a word from its middle as the stop sequence.
    said = _ollama_chat(server, "Say hello", {"temperature": 0, "num_predict": 16})["message"][
        "content"
    ]
    words = said.split()
    assert len(words) >= 3, said
    stop = words[2]
    m = client.messages.create(
        model=MODEL,
        max_tokens=16,
        stop_sequences=["<never>", stop],
        messages=[{"role": "user", "content": "Say hello"}],
        extra_body=GREEDY,
    )
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == said[: said.index(stop)]
    plain = client.messages.create(
        model=MODEL,
        max_tokens=16,
        stop_sequences=["<never>"],
        messages=[{"role": "user", "content": "Say hello"}],
        extra_body=GREEDY,
    )
    assert plain.stop_sequence is None and plain.stop_reason in ("end_turn", "max_tokens")


def test_stream_events_come_in_anthropic_order_and_rebuild_the_message(server: Running) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 8,
        "stream": True,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello"}],
    }
    r, events = post_events(f"{server.url}/v1/messages", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    adapter = TypeAdapter(RawMessageStreamEvent)
    parsed = [adapter.validate_python(d) for n, d in events if n != "ping"]
    text = "".join(e.delta.text for e in parsed if e.type == "content_block_delta")
    delta = next(e for e in parsed if e.type == "message_delta")
    ollama = _ollama_chat(server, "Say hello", {"temperature": 0, "num_predict": 8})
    assert text == ollama["message"]["content"]
    assert (
        delta.usage.input_tokens + delta.usage.cache_read_input_tokens,
        delta.usage.output_tokens,
    ) == (
        ollama["prompt_eval_count"] + ollama["prompt_cached_count"],
        ollama["eval_count"],
    )


def test_sdk_stream_helper_accumulates_the_final_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=MODEL, max_tokens=6, messages=[{"role": "user", "content": "Count"}]
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == "".join(texts) and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 6 and final.usage.input_tokens > 0


def test_json_schema_output_gives_json_that_parses(client: anthropic.Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    m = client.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=[{"role": "user", "content": "2+2 as JSON"}],
        extra_body={
            **GREEDY,
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
        },
    )
    assert isinstance(json.loads(m.content[0].text)["answer"], int)


def test_forced_tool_use_and_its_result_round_trip(client: anthropic.Anthropic) -> None:
    m = client.messages.create(
        model=TOOLS_MODEL,
        max_tokens=48,
        tools=[LOOKUP],
        tool_choice={"type": "tool", "name": "lookup"},
        messages=[{"role": "user", "content": "Look up cats"}],
        extra_body=GREEDY,
    )
    assert m.stop_reason == "tool_use"
    use = next(b for b in m.content if b.type == "tool_use")
    assert (
        use.name == "lookup" and use.input["q"] in ("cats", "dogs") and use.id.startswith("toolu_")
    )
    follow = client.messages.create(
        model=TOOLS_MODEL,
        max_tokens=6,
        tools=[LOOKUP],
        messages=[
            {"role": "user", "content": "Look up cats"},
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": "cats are mammals"}
                ],
            },
        ],
        extra_body=GREEDY,
    )
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert (
        follow.usage.input_tokens + follow.usage.cache_read_input_tokens
        > m.usage.input_tokens + m.usage.cache_read_input_tokens
    )


def test_streamed_tool_use_comes_as_input_json_deltas(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=TOOLS_MODEL,
        max_tokens=48,
        tools=[LOOKUP],
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "Look up dogs"}],
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert any(
        e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events
    )
    use = next(b for b in final.content if b.type == "tool_use")
    assert use.name == "lookup" and use.input["q"] in ("cats", "dogs")
    assert final.stop_reason == "tool_use"


def test_thinking_comes_as_a_thinking_block(server: Running, client: anthropic.Anthropic) -> None:
    m = client.messages.create(
        model=THINK_MODEL,
        max_tokens=8,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "Why?"}],
    )
    assert m.content[0].type == "thinking" and m.content[0].thinking
    body = {
        "model": THINK_MODEL,
        "max_tokens": 8,
        "stream": True,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "Why?"}],
    }
    _, events = post_events(f"{server.url}/v1/messages", body)
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert deltas and deltas[0]["type"] == "thinking_delta"


def test_count_tokens_equals_the_input_tokens_of_the_same_request(
    client: anthropic.Anthropic,
) -> None:
    request = {
        "model": TOOLS_MODEL,
        "system": [{"type": "text", "text": "Be brief."}],
        "tools": [LOOKUP],
        "messages": [{"role": "user", "content": "Look up cats"}],
    }
    counted = client.messages.count_tokens(**request).input_tokens
    m = client.messages.create(max_tokens=2, **request)
    # count_tokens counts the whole prompt; a reply counts what a cache held apart.
    assert counted == m.usage.input_tokens + m.usage.cache_read_input_tokens > 0
    thinking = client.messages.create(
        model=THINK_MODEL,
        max_tokens=2,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "Why?"}],
    ).usage
    assert (
        client.messages.count_tokens(
            model=THINK_MODEL,
            thinking={"type": "enabled", "budget_tokens": 1024},
            messages=[{"role": "user", "content": "Why?"}],
        ).input_tokens
        == thinking.input_tokens + thinking.cache_read_input_tokens
    )


def _user(*blocks: dict) -> list[dict]:
    return [{"role": "user", "content": list(blocks)}]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": _user({"type": "bogus"})}, "unknown block type"),
        (
            {"messages": _user({"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"})},
            "toolu_x",
        ),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"messages": []}, "at least 1"),
        ({"tools": [LOOKUP]}, "does not support tools"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "does not support thinking"),
        (
            {
                "messages": _user(
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                    }
                )
            },
            "no vision support",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "only custom tools"),
        ({"tool_choice": {"type": "tool", "name": "nope"}, "tools": [LOOKUP]}, "nope"),
    ],
)
def test_bad_input_gets_a_400_in_anthropic_shape(
    server: Running, client: anthropic.Anthropic, body: dict, message: str
) -> None:
    full = {
        "model": MODEL,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
        **body,
    }
    r = httpx.post(f"{server.url}/v1/messages", json=full, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert message in r.json()["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(**full)


def test_missing_model_is_a_not_found_error(server: Running, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(
            model="no-such:model", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(
            model="no-such:model", messages=[{"role": "user", "content": "hi"}]
        )
    r = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
