"""OpenAI's API through the official ``openai`` client, against the real server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.runtime.conftest import MODEL, TOOLS_MODEL, Running


@pytest.fixture()
def client(server: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_chat_completion_has_message_finish_reason_and_usage(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=6,
        temperature=0,
        seed=1,
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert (
        r.usage.completion_tokens <= 6
        and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    )


def test_chat_completion_streams_sse_with_usage_when_asked(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count"}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_sse_ends_with_done(server: Running) -> None:
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        timeout=60,
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2,
            "stream": True,
        },
    ) as r:
        lines = [x for x in r.iter_lines() if x]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)


def test_response_format_json_schema_parses(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "2+2 as JSON"}],
        max_tokens=24,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert isinstance(json.loads(r.choices[0].message.content)["answer"], int)


def test_tool_calls_come_back_in_openai_shape(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {
                    "type": "object",
                    "properties": {"q": {"type": "string"}},
                    "required": ["q"],
                },
            },
        }
    ]
    forced = {
        "type": "object",
        "properties": {
            "name": {"const": "lookup"},
            "arguments": {
                "type": "object",
                "properties": {"q": {"enum": ["cats"]}},
                "required": ["q"],
            },
        },
        "required": ["name", "arguments"],
    }
    r = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=[{"role": "user", "content": "Look up cats"}],
        tools=tools,
        max_tokens=48,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": forced}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert (
        call.type == "function"
        and call.function.name == "lookup"
        and json.loads(call.function.arguments) == {"q": "cats"}
    )
    # The call goes back into the conversation, as a client loop sends it.
    follow = client.chat.completions.create(
        model=TOOLS_MODEL,
        max_tokens=4,
        temperature=0,
        tools=tools,
        messages=[
            {"role": "user", "content": "Look up cats"},
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "cats are mammals"},
        ],
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens <= 5
    parts = list(
        client.completions.create(model=MODEL, prompt="One, two,", max_tokens=5, stream=True)
    )
    assert parts[-1].choices[0].finish_reason in ("stop", "length")


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert MODEL in ids
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such:model")


def test_embeddings_float_and_base64_agree(client: openai.OpenAI) -> None:
    a = client.embeddings.create(model=MODEL, input=["hello", "world"], encoding_format="float")
    b = client.embeddings.create(
        model=MODEL, input=["hello", "world"]
    )  # the client asks for base64
    assert [d.index for d in a.data] == [0, 1]
    for x, y in zip(a.data, b.data, strict=True):
        assert max(abs(p - q) for p, q in zip(x.embedding, y.embedding, strict=True)) < 1e-5
    assert abs(sum(v * v for v in a.data[0].embedding) - 1) < 1e-4 and a.usage.prompt_tokens > 0


def test_errors_take_openai_shape(server: Running, client: openai.OpenAI) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "nope:1", "messages": []}, timeout=10
    )
    err = r.json()["error"]
    assert (
        r.status_code == 404
        and err["code"] == "model_not_found"
        and err["type"] == "invalid_request_error"
    )
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("invalid JSON")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], n=2
        )


def test_streamed_tool_calls_arrive_in_the_last_chunk(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    forced = {
        "type": "object",
        "properties": {
            "name": {"const": "lookup"},
            "arguments": {
                "type": "object",
                "properties": {"q": {"enum": ["dogs"]}},
                "required": ["q"],
            },
        },
        "required": ["name", "arguments"],
    }
    chunks = list(
        client.chat.completions.create(
            model=TOOLS_MODEL,
            messages=[{"role": "user", "content": "Look up dogs"}],
            tools=tools,
            max_tokens=48,
            temperature=0,
            stream=True,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "call", "schema": forced},
            },
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "lookup" and calls[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_naming_a_function_makes_the_model_call_it(client: openai.OpenAI) -> None:
    params = {
        "type": "object",
        "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["unit"],
    }
    tools = [
        {"type": "function", "function": {"name": "weather", "parameters": params}},
        {"type": "function", "function": {"name": "time", "parameters": {"type": "object"}}},
    ]
    r = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "weather"}},
        max_tokens=48,
        temperature=0,
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments)["unit"] in ("celsius", "fahrenheit")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=TOOLS_MODEL,
            messages=[{"role": "user", "content": "x"}],
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
