"""Wrong nested types in untrusted request bodies answer 400 in the API's own error shape.

The OpenAI, Responses and Anthropic translators read fields they cannot type in their schemas
(message content, tool calls, tool choices, input items). A value of the wrong type there is the
client's mistake: a one-line 400 naming the field, never a 500 with pydantic's or Python's text.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from offload.runtime.errors import BadRequest
from offload.runtime.server.openai_schemas import untrusted_input
from offload.runtime.serving.requests import ChatRequest
from tests.runtime.conftest import MODEL, TOOLS_MODEL, Running

_TOOL = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}},
}
_DEEP = "[" * 100_000


def _chat(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 2, "messages": messages, **extra}


def _user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def _assistant_calls(tool_calls: Any) -> list[dict[str, Any]]:
    return [_user("hi"), {"role": "assistant", "content": None, "tool_calls": tool_calls}]


def _call(function: Any) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": function}


CHAT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("content-int", _chat([_user(5)]), "content"),
    ("content-bool", _chat([_user(True)]), "content"),
    ("text-part-int", _chat([_user([{"type": "text", "text": 5}])]), "text"),
    ("text-part-null", _chat([_user([{"type": "text", "text": None}])]), "text"),
    (
        "image-url-string",
        _chat([_user([{"type": "image_url", "image_url": "http://x/y.png"}])]),
        "image_url",
    ),
    ("role-int", _chat([{"role": 5, "content": "hi"}]), "role"),
    ("role-null", _chat([{"role": None, "content": "hi"}]), "role"),
    ("role-list", _chat([{"role": ["user"], "content": "hi"}]), "role"),
    (
        "tool-name-int",
        _chat([_user("hi"), {"role": "tool", "name": 5, "content": "x"}]),
        "name",
    ),
    ("tool-calls-string", _chat(_assistant_calls("abc")), "tool_calls"),
    ("tool-calls-int-item", _chat(_assistant_calls([1])), "tool_calls"),
    ("tool-calls-dict", _chat(_assistant_calls({"a": 1})), "tool_calls"),
    ("tool-call-function-string", _chat(_assistant_calls([_call("x")])), "function"),
    (
        "arguments-array",
        _chat(_assistant_calls([_call({"name": "f", "arguments": "[1]"})])),
        "arguments",
    ),
    (
        "arguments-int",
        _chat(_assistant_calls([_call({"name": "f", "arguments": 5})])),
        "arguments",
    ),
    (
        "arguments-int-string",
        _chat(_assistant_calls([_call({"name": "f", "arguments": "5"})])),
        "arguments",
    ),
    (
        "arguments-deep",
        _chat(_assistant_calls([_call({"name": "f", "arguments": _DEEP})])),
        "arguments",
    ),
    ("call-name-int", _chat(_assistant_calls([_call({"name": 5, "arguments": "{}"})])), "name"),
    (
        "call-name-null",
        _chat(_assistant_calls([_call({"name": None, "arguments": "{}"})])),
        "name",
    ),
    (
        "json-schema-string",
        _chat([_user("hi")], response_format={"type": "json_schema", "json_schema": "x"}),
        "json_schema",
    ),
    (
        "tool-function-int",
        _chat([_user("hi")], model=TOOLS_MODEL, tools=[{"type": "function", "function": 5}]),
        "tools",
    ),
    (
        "tool-choice-function-string",
        _chat(
            [_user("hi")],
            model=TOOLS_MODEL,
            tools=[_TOOL],
            tool_choice={"type": "function", "function": "x"},
        ),
        "tool_choice",
    ),
    (
        "tool-choice-function-only-string",
        _chat([_user("hi")], model=TOOLS_MODEL, tools=[_TOOL], tool_choice={"function": "x"}),
        "tool_choice",
    ),
    (
        "tool-choice-name-int",
        _chat(
            [_user("hi")],
            model=TOOLS_MODEL,
            tools=[_TOOL],
            tool_choice={"type": "function", "function": {"name": 5}},
        ),
        "tool_choice",
    ),
]


def _responses(input_: Any, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_output_tokens": 2, "input": input_, **extra}


_FN_TOOL = {"type": "function", "name": "weather", "parameters": {"type": "object"}}

RESPONSES_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("role-list", _responses([{"role": ["user"], "content": "hi"}]), "role"),
    ("role-dict", _responses([{"role": {"a": 1}, "content": "hi"}]), "role"),
    (
        "call-id-list",
        _responses(
            [
                _user("hi"),
                {"type": "function_call_output", "call_id": ["c"], "output": "x"},
            ]
        ),
        "call_id",
    ),
    (
        "call-id-dict",
        _responses(
            [
                _user("hi"),
                {"type": "function_call_output", "call_id": {"c": 1}, "output": "x"},
            ]
        ),
        "call_id",
    ),
    (
        "function-call-call-id-list",
        _responses(
            [
                _user("hi"),
                {"type": "function_call", "call_id": ["c"], "name": "f", "arguments": "{}"},
            ]
        ),
        "call_id",
    ),
    (
        "allowed-tools-int",
        _responses(
            "hi",
            model=TOOLS_MODEL,
            tools=[_FN_TOOL],
            tool_choice={"type": "allowed_tools", "mode": "auto", "tools": 5},
        ),
        "tools",
    ),
    (
        "allowed-tools-name-list",
        _responses(
            "hi",
            model=TOOLS_MODEL,
            tools=[_FN_TOOL],
            tool_choice={"type": "allowed_tools", "tools": [{"type": "function", "name": ["x"]}]},
        ),
        "tool_choice",
    ),
    (
        "arguments-deep",
        _responses(
            [
                _user("hi"),
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": _DEEP},
            ]
        ),
        "arguments",
    ),
    (
        "arguments-array",
        _responses(
            [
                _user("hi"),
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"},
            ]
        ),
        "arguments",
    ),
]


def _messages(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 2, "messages": messages}


def _tool_result(tool_use_id: Any) -> list[dict[str, Any]]:
    return [
        _user("hi"),
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
        },
        _user([{"type": "tool_result", "tool_use_id": tool_use_id, "content": "x"}]),
    ]


ANTHROPIC_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("tool-use-id-list", _messages(_tool_result(["t1"])), "tool_use_id"),
    ("tool-use-id-dict", _messages(_tool_result({"t1": 1})), "tool_use_id"),
]


def _assert_one_line(message: Any, mentions: str) -> None:
    assert isinstance(message, str) and message
    assert "\n" not in message
    assert "http" not in message and "Traceback" not in message
    assert mentions in message


def _post(server: Running, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


@pytest.mark.parametrize(
    ("body", "mentions"), [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES]
)
def test_chat_completions_refuses_wrong_types_with_400(
    server: Running, body: dict[str, Any], mentions: str
) -> None:
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    _assert_one_line(err["message"], mentions)


@pytest.mark.parametrize(
    ("body", "mentions"), [c[1:] for c in RESPONSES_CASES], ids=[c[0] for c in RESPONSES_CASES]
)
def test_responses_refuses_wrong_types_with_400(
    server: Running, body: dict[str, Any], mentions: str
) -> None:
    r = _post(server, "/v1/responses", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    _assert_one_line(err["message"], mentions)


@pytest.mark.parametrize(
    ("body", "mentions"), [c[1:] for c in ANTHROPIC_CASES], ids=[c[0] for c in ANTHROPIC_CASES]
)
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_messages_refuses_wrong_types_with_400(
    server: Running, path: str, body: dict[str, Any], mentions: str
) -> None:
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    data = r.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    _assert_one_line(data["error"]["message"], mentions)


def test_valid_requests_still_answer_after_the_attacks(server: Running) -> None:
    chat = _post(server, "/v1/chat/completions", _chat([_user("hi")]))
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    resp = _post(server, "/v1/responses", _responses("hi"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "response"
    msg = _post(server, "/v1/messages", _messages([_user("hi")]))
    assert msg.status_code == 200, msg.text
    assert msg.json()["type"] == "message"


def test_valid_tool_call_history_still_answers(server: Running) -> None:
    """Well-formed tool calls (arguments as a JSON string, as an object, or empty) still pass."""
    calls = [
        _call({"name": "weather", "arguments": '{"city": "Paris"}'}),
        _call({"name": "weather", "arguments": {"city": "Rome"}}),
        _call({"name": "weather", "arguments": ""}),
    ]
    messages = [
        *_assistant_calls(calls),
        {"role": "tool", "name": "weather", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = _post(server, "/v1/chat/completions", _chat(messages, model=TOOLS_MODEL, tools=[_TOOL]))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("fail", "mentions"),
    [
        (lambda: ChatRequest.model_validate({"model": "m", "messages": [{"role": 5}]}), "role"),
        (lambda: ChatRequest.model_validate({"model": 5, "messages": "x"}), "model"),
        (lambda: {["unhashable"]: 1}, "unhashable"),
        (lambda: "text".get("x"), "get"),
        (lambda: {}["missing"], "missing"),
        (lambda: __import__("json").loads("[" * 100_000), "nested too deeply"),
    ],
    ids=["validation", "validation-many", "type", "attribute", "key", "recursion"],
)
def test_untrusted_input_turns_translation_errors_into_one_line_400(
    fail: Any, mentions: str
) -> None:
    with pytest.raises(BadRequest) as caught, untrusted_input():
        fail()
    assert caught.value.http_status == 400
    _assert_one_line(str(caught.value), mentions)
    assert "errors.pydantic.dev" not in str(caught.value)
