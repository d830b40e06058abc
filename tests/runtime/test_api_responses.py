"""OpenAI's Responses API through the official ``openai`` client, against the real server.

Raw answers are also validated against the SDK's own pydantic types (``model_validate``, which
checks every required field, unlike the SDK's lenient parsing).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from offload.runtime.server.response_memory import ResponseMemory
from tests.runtime.conftest import MODEL, THINK_MODEL, TOOLS_MODEL, Running
from tests.runtime.sse_events import post_events

LOOKUP = {
    "type": "function",
    "name": "lookup",
    "description": "Look something up",
    "parameters": {
        "type": "object",
        "properties": {"q": {"type": "string", "enum": ["cats", "dogs"]}},
        "required": ["q"],
    },
}


@pytest.fixture()
def client(server: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_plain_answer_parses_into_the_sdk_types_with_usage_equal_to_ollama_counts(
    server: Running, client: openai.OpenAI
) -> None:
    r = client.responses.create(model=MODEL, input="Say hello", max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.output_text and r.output[-1].type == "message"
    raw = httpx.post(
        f"{server.url}/v1/responses",
        json={"model": MODEL, "input": "Say hello", "max_output_tokens": 8, "temperature": 0},
        timeout=120,
    ).json()
    strict = Response.model_validate(raw)
    ollama = httpx.post(
        f"{server.url}/api/chat",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello"}],
            "options": {"temperature": 0, "num_predict": 8},
            "stream": False,
        },
        timeout=120,
    ).json()
    assert strict.output_text == r.output_text == ollama["message"]["content"]
    # The whole prompt in tokens (OpenAI counts the cached part in, and details it), as Ollama's
    # prompt_eval_count and prompt_cached_count together.
    assert (r.usage.input_tokens, r.usage.output_tokens) == (
        ollama["prompt_eval_count"] + ollama["prompt_cached_count"],
        ollama["eval_count"],
    )
    assert r.usage.input_tokens_details.cached_tokens <= r.usage.input_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_max_output_tokens_ends_it_incomplete_with_its_reason(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Tell a long story", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[-1].status == "incomplete"


def test_stream_sends_typed_events_in_order_that_rebuild_the_answer(server: Running) -> None:
    body = {
        "model": MODEL,
        "input": "Say hello",
        "max_output_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    r, events = post_events(f"{server.url}/v1/responses", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    adapter = TypeAdapter(ResponseStreamEvent)
    parsed = [adapter.validate_python(data) for _, data in events]
    assert all(name == data["type"] for name, data in events)  # the event: line names the data
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    kinds = [e.type for e in parsed]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    text = "".join(e.delta for e in parsed if e.type == "response.output_text.delta")
    final = parsed[-1].response
    assert text and final.output_text == text and final.usage.output_tokens == 8


def test_sdk_stream_ends_with_the_whole_response(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(model=MODEL, input="Count", max_output_tokens=5, stream=True)
    )
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == "".join(
        e.delta for e in events if e.type == "response.output_text.delta"
    )


def test_json_schema_text_format_gives_json_that_parses(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    r = client.responses.create(
        model=MODEL,
        input="2+2 as JSON",
        max_output_tokens=24,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "sum", "schema": schema}},
    )
    assert isinstance(json.loads(r.output_text)["answer"], int)
    assert r.text.format.type == "json_schema"


def test_forced_tool_call_and_its_output_round_trip(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=TOOLS_MODEL,
        input="Look up cats",
        tools=[LOOKUP],
        tool_choice={"type": "function", "name": "lookup"},
        max_output_tokens=48,
        temperature=0,
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1
    call = calls[0]
    assert call.name == "lookup" and json.loads(call.arguments)["q"] in ("cats", "dogs")
    # The whole conversation sent back, as a stateless agent loop does.
    follow = client.responses.create(
        model=TOOLS_MODEL,
        input=[
            {"role": "user", "content": "Look up cats"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "cats are mammals"},
        ],
        tools=[LOOKUP],
        max_output_tokens=6,
        temperature=0,
    )
    assert follow.status in ("completed", "incomplete") and follow.output
    # Or only the result, continuing the stored response that made the call.
    chained = client.responses.create(
        model=TOOLS_MODEL,
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "mammals"}],
        tools=[LOOKUP],
        max_output_tokens=6,
        temperature=0,
    )
    assert chained.previous_response_id == r.id
    assert chained.usage.input_tokens > r.usage.input_tokens  # the earlier turn is in the prompt


def test_streamed_tool_call_comes_as_function_call_argument_events(server: Running) -> None:
    body = {
        "model": TOOLS_MODEL,
        "input": "Look up dogs",
        "tools": [LOOKUP],
        "tool_choice": "required",
        "max_output_tokens": 48,
        "temperature": 0,
        "stream": True,
    }
    _, events = post_events(f"{server.url}/v1/responses", body)
    adapter = TypeAdapter(ResponseStreamEvent)
    parsed = [adapter.validate_python(data) for _, data in events]
    kinds = [e.type for e in parsed]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in parsed if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments)["q"] in ("cats", "dogs")
    item = next(
        e.item
        for e in parsed
        if e.type == "response.output_item.done" and e.item.type == "function_call"
    )
    assert item.arguments == done.arguments and item.name == "lookup"
    assert kinds[-1] == "response.completed"


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=4)
    assert client.responses.retrieve(first.id).id == first.id
    second = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=4
    )
    alone = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=4)
    assert second.usage.input_tokens > alone.usage.input_tokens


def test_store_false_is_not_kept(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError, match="unknown or has expired"):
        client.responses.create(model=MODEL, input="hi", previous_response_id=r.id)


def test_reasoning_streams_a_reasoning_item_on_a_thinking_model(
    server: Running, client: openai.OpenAI
) -> None:
    r = client.responses.create(
        model=THINK_MODEL, input="Why?", reasoning={"effort": "low"}, max_output_tokens=8
    )
    assert r.output[0].type == "reasoning" and r.output[0].content[0].text
    body = {
        "model": THINK_MODEL,
        "input": "Why?",
        "reasoning": {"effort": "low"},
        "max_output_tokens": 8,
        "stream": True,
    }
    _, events = post_events(f"{server.url}/v1/responses", body)
    adapter = TypeAdapter(ResponseStreamEvent)
    parsed = [adapter.validate_python(data) for _, data in events]
    assert any(e.type == "response.reasoning_text.delta" for e in parsed)
    assert parsed[-1].response.output[0].type == "reasoning"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": MODEL, "input": [{"type": "bogus"}]}, "unknown input item type"),
        ({"model": MODEL, "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": MODEL, "input": "x", "max_output_tokens": -5}, "max_output_tokens"),
        (
            {"model": MODEL, "input": "x", "previous_response_id": "resp_nope"},
            "unknown or has expired",
        ),
        (
            {
                "model": MODEL,
                "input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}],
            },
            "no function_call",
        ),
        ({"model": MODEL, "input": "x", "tools": [LOOKUP]}, "does not support tools"),
        (
            {"model": MODEL, "input": "x", "reasoning": {"effort": "high"}},
            "does not support thinking",
        ),
        (
            {
                "model": MODEL,
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
                        ],
                    }
                ],
            },
            "no vision support",
        ),
        ({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, "only function tools"),
        ({"model": MODEL, "input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
    ],
)
def test_bad_input_gets_a_400_in_openai_shape(
    server: Running, client: openai.OpenAI, body: dict, message: str
) -> None:
    r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=120)
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["code"] is None
    assert message in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.responses.create(**body)


def test_missing_model_is_a_not_found_error_with_its_code(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="no-such:model", input="hi")
    assert e.value.code == "model_not_found"


def test_memory_forgets_by_count_and_by_age() -> None:
    now = [0.0]
    memory = ResponseMemory(max_kept=2, max_age_s=60, clock=lambda: now[0])
    for rid in ("a", "b", "c"):
        memory.keep(rid, [{"role": "user", "content": rid}], {"id": rid})
    assert memory.get("a") is None and memory.get("b") is not None  # the oldest went first
    now[0] = 61.0
    memory.keep("d", [], {"id": "d"})
    assert memory.get("b") is None and memory.get("c") is None and memory.get("d") is not None
