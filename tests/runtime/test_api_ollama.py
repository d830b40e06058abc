"""Ollama's API through the official ``ollama`` client and plain HTTP, against the real server."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from tests.runtime.conftest import MODEL, THINK_MODEL, TOOLS_MODEL, Running

FAST = {"num_predict": 8, "temperature": 0, "seed": 1}


@pytest.fixture()
def client(server: Running) -> ollama.Client:
    return ollama.Client(host=server.url)


def test_generate_streams_pieces_then_a_summary_with_context(client: ollama.Client) -> None:
    parts = list(client.generate(model=MODEL, prompt="The sky is", options=FAST, stream=True))
    assert len(parts) >= 2 and all(not p.done for p in parts[:-1])
    final = parts[-1]
    assert final.done and final.done_reason == "length" and final.eval_count == 8
    # prompt_eval_count counts only what was computed: a prefix cached by an earlier request is not.
    assert final.context and len(final.context) >= final.prompt_eval_count + final.eval_count


def test_generate_accepts_context_back_and_raw_returns_none(client: ollama.Client) -> None:
    first = client.generate(model=MODEL, prompt="Count: one two", options=FAST)
    again = client.generate(model=MODEL, prompt="three", context=first.context, options=FAST)
    assert again.context[: len(first.context)] == first.context
    # The earlier turn is still in the runner's cache: only the new tokens (and the last answer
    # token, which was never evaluated) are computed, as Ollama counts them.
    assert (
        0
        < again.prompt_eval_count
        <= len(again.context) - len(first.context) - again.eval_count + 1
    )
    raw = client.generate(model=MODEL, prompt="one two three", raw=True, options=FAST)
    assert raw.context is None and raw.response


def test_generate_is_deterministic_with_seed_and_temperature_zero(client: ollama.Client) -> None:
    a = client.generate(model=MODEL, prompt="Once upon a time", options=FAST).response
    b = client.generate(model=MODEL, prompt="Once upon a time", options=FAST).response
    assert a == b and a


def test_json_schema_format_gives_json_that_parses_and_validates(client: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "blue"]}},
        "required": ["ok", "color"],
    }
    r = client.generate(
        model=MODEL,
        prompt="Answer in JSON.",
        format=schema,
        options={"num_predict": 48, "temperature": 0},
    )
    data = json.loads(r.response)
    assert isinstance(data["ok"], bool) and data["color"] in ("red", "blue")
    assert r.done_reason == "stop"


def test_json_format_on_chat_gives_an_object(client: ollama.Client) -> None:
    r = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Reply with JSON"}],
        format="json",
        options={"num_predict": 16, "temperature": 0, "seed": 3},
    )
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.message.content), dict)
    else:  # cut by num_predict: still the start of an object
        assert r.message.content.startswith("{")


def test_chat_streams_and_returns_done_reason(client: ollama.Client) -> None:
    parts = list(
        client.chat(
            model=MODEL,
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            options=FAST,
            stream=True,
        )
    )
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert "".join(p.message.content for p in parts)
    whole = client.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], options=FAST)
    assert whole.message.role == "assistant" and whole.eval_count <= 8


def test_tool_calls_are_parsed_from_a_model_whose_template_supports_tools(
    client: ollama.Client,
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    # The grammar makes the tiny model answer with a call, so the parse is what is tested.
    forced = {
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "arguments": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris"]}},
                "required": ["city"],
            },
        },
        "required": ["name", "arguments"],
    }
    r = client.chat(
        model=TOOLS_MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools,
        format=forced,
        options={"num_predict": 64, "temperature": 0},
    )
    assert r.message.tool_calls, r.message
    call = r.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    assert r.message.content == ""
    # Streamed, the call's JSON is never sent as text and the call arrives parsed at the end.
    chunks = list(
        client.chat(
            model=TOOLS_MODEL,
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=tools,
            format=forced,
            stream=True,
            options={"num_predict": 64, "temperature": 0},
        )
    )
    assert "".join(c.message.content or "" for c in chunks) == ""
    assert chunks[-1].done and chunks[-1].message.tool_calls[0].function.arguments == {
        "city": "Paris"
    }
    # An answer in prose streams while it is written, tools or not.
    prose = {"type": "string", "enum": ["It is sunny in Paris today, as far as I know."]}
    chunks = list(
        client.chat(
            model=TOOLS_MODEL,
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=tools,
            format=prose,
            stream=True,
            options={"num_predict": 32, "temperature": 0},
        )
    )
    early = [c.message.content for c in chunks if not c.done and c.message.content]
    assert len(early) >= 3 and not chunks[-1].message.tool_calls


def test_tools_on_a_model_without_tool_support_is_a_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert e.value.status_code == 400 and "does not support tools" in e.value.error


def test_think_is_refused_without_a_reasoning_template_and_accepted_with_one(
    client: ollama.Client,
) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "x"}], think=True)
    assert e.value.status_code == 400 and "does not support thinking" in e.value.error
    r = client.chat(
        model=THINK_MODEL, messages=[{"role": "user", "content": "2+2?"}], think=True, options=FAST
    )
    # The template opens <think>, so what the model writes first is its reasoning.
    assert r.done and r.eval_count <= 8 and r.message.thinking
    assert "<think>" not in (r.message.content or "")
    # /api/generate renders the same template with .Think set, and splits the same way.
    g = client.generate(model=THINK_MODEL, prompt="2+2?", think=True, options=FAST)
    assert g.done and g.thinking and "<think>" not in (g.response or "")
    plain = client.generate(model=THINK_MODEL, prompt="2+2?", options=FAST)
    assert not plain.thinking


def test_embed_gives_unit_vectors_for_a_list_and_honours_dimensions(client: ollama.Client) -> None:
    r = client.embed(model=MODEL, input=["hello world", "goodbye"])
    assert len(r.embeddings) == 2
    for v in r.embeddings:
        assert abs(sum(x * x for x in v) - 1.0) < 1e-4
    assert r.embeddings[0] != r.embeddings[1]
    short = client.embed(model=MODEL, input="hello world", dimensions=64)
    assert (
        len(short.embeddings[0]) == 64 and abs(sum(x * x for x in short.embeddings[0]) - 1) < 1e-4
    )
    legacy = client.embeddings(model=MODEL, prompt="hello world")
    assert len(legacy.embedding) == len(r.embeddings[0])


def test_embed_refuses_a_too_long_input_when_truncate_is_false(server: Running) -> None:
    r = httpx.post(
        f"{server.url}/api/embed",
        json={"model": MODEL, "input": "word " * 5000, "truncate": False},
        timeout=120,
    )
    assert r.status_code == 400 and "context" in r.json()["error"]


def test_tags_ps_and_version(client: ollama.Client, server: Running) -> None:
    names = {m.model for m in client.list().models}
    assert {MODEL, TOOLS_MODEL} <= names
    client.generate(model=MODEL, prompt="hi", options=FAST, keep_alive="3m")
    running = {m.model: m for m in client.ps().models}
    m = running[MODEL]
    assert m.size and m.size_vram == 0 and m.context_length and m.expires_at
    raw = httpx.get(f"{server.url}/api/ps").json()["models"]
    assert any(x["plan"]["devices"][0]["kind"] == "CPU" for x in raw)
    assert httpx.get(f"{server.url}/api/version").json()["version"]


def test_keep_alive_zero_unloads_as_ollama_stop_does(client: ollama.Client) -> None:
    client.generate(model=MODEL, prompt="hi", options=FAST)
    assert MODEL in {m.model for m in client.ps().models}
    r = client.generate(model=MODEL, keep_alive=0)
    assert r.done_reason == "unload"
    assert MODEL not in {m.model for m in client.ps().models}


def test_unknown_model_is_404_and_bad_name_is_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="no-such-model:1b", prompt="x")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="bad name!", prompt="x")
    assert e.value.status_code == 400


def test_malformed_json_is_400_with_the_parser_message(server: Running) -> None:
    r = httpx.post(f"{server.url}/api/generate", content=b'{"model": "x", ', timeout=10)
    assert r.status_code == 400 and r.json()["error"].startswith("invalid JSON: ")


def test_unknown_fields_are_ignored(server: Running) -> None:
    r = httpx.post(
        f"{server.url}/api/generate",
        json={
            "model": MODEL,
            "prompt": "hi",
            "stream": False,
            "no_such_field": 1,
            "options": {**FAST, "nope": 2},
        },
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["done"]


def test_images_suffix_and_strict_truncation_are_clear_400s(server: Running) -> None:
    def post(body: dict) -> httpx.Response:
        return httpx.post(
            f"{server.url}/api/generate", json={"model": MODEL, "stream": False, **body}, timeout=60
        )

    r = post({"prompt": "x", "images": ["aGVsbG8="]})
    assert r.status_code == 400 and "vision" in r.json()["error"]
    r = post({"prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and "does not support insert" in r.json()["error"]
    # 512 because llama.cpp may pad a smaller context up (then the engine and llama.cpp disagree).
    long_prompt = "word " * 700
    r = post(
        {"prompt": long_prompt, "truncate": False, "options": {"num_ctx": 512, "num_predict": 1}}
    )
    assert r.status_code == 400 and "context" in r.json()["error"]
    r = post({"prompt": long_prompt, "options": {"num_ctx": 512, "num_predict": 2}})
    assert r.status_code == 200 and r.json()["prompt_eval_count"] < 512


def test_every_sampling_option_is_accepted(client: ollama.Client) -> None:
    opts = {
        "num_predict": 4,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "min_p": 0.05,
        "typical_p": 0.9,
        "repeat_penalty": 1.2,
        "repeat_last_n": 32,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "mirostat": 2,
        "mirostat_tau": 4.0,
        "mirostat_eta": 0.2,
        "seed": 7,
        "stop": ["\n\n"],
        "num_thread": 2,
        "num_batch": 256,
        "use_mmap": True,
    }
    r = client.generate(model=MODEL, prompt="Hello", options=opts)
    assert r.done and r.eval_count <= 4


def test_wrong_option_type_is_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL, prompt="x", options={"num_predict": "lots"})
    assert e.value.status_code == 400
