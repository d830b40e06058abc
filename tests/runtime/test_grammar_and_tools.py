"""JSON Schema to GBNF, tool-call parsing and the thinking splitter (pure functions)."""

from __future__ import annotations

import pytest

from offload.runtime.errors import BadRequest
from offload.runtime.text.grammar import JSON_GBNF, grammar_for_format, schema_to_gbnf
from offload.runtime.text.tools import (
    ThinkSplitter,
    ToolCallStreamer,
    parse_tool_calls,
    supports_thinking,
    supports_tools,
)


def test_json_format_gives_the_generic_object_grammar() -> None:
    assert grammar_for_format("json") == JSON_GBNF and grammar_for_format("") is None
    assert "root ::= object" in JSON_GBNF


def test_schema_grammar_lists_required_keys_enums_and_types() -> None:
    g = schema_to_gbnf(
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 5},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                "kind": {"enum": ["a", 1, None]},
                "nick": {"type": ["string", "null"]},
            },
            "required": ["name", "age"],
        }
    )
    assert g.startswith("root ::= ")
    assert (
        '"\\"name\\""' in g
        and "char{0,5}" in g
        and '"\\"a\\""' in g
        and '"1"' in g
        and '"null"' in g
    )
    assert "integer ::=" in g and "{0,1}" in g


def test_refs_to_defs_are_followed_as_pydantic_writes_them() -> None:
    schema = {
        "$defs": {
            "Pet": {"type": "object", "properties": {"n": {"type": "string"}}, "required": ["n"]}
        },
        "type": "object",
        "properties": {"pet": {"$ref": "#/$defs/Pet"}},
        "required": ["pet"],
    }
    g = schema_to_gbnf(schema)
    assert "ref-pet ::=" in g


def test_bad_formats_are_bad_requests() -> None:
    with pytest.raises(BadRequest):
        grammar_for_format("yaml")
    with pytest.raises(BadRequest):
        grammar_for_format({"$ref": "http://example.com/s.json"})


def test_tool_calls_are_found_bare_in_tags_and_in_lists() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    content, calls = parse_tool_calls(
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', tools
    )
    assert content == "" and calls == [{"function": {"name": "f", "arguments": {"x": 1}}}]
    _, calls = parse_tool_calls(
        '[{"name": "f", "parameters": {}}, {"name": "f", "arguments": "{\\"y\\": 2}"}]', tools
    )
    assert [c["function"]["arguments"] for c in calls] == [{}, {"y": 2}]
    content, calls = parse_tool_calls('I think {"name": "g", "arguments": {}} is not a tool', tools)
    assert calls == [] and "g" in content


def test_think_splitter_handles_tags_cut_between_pieces() -> None:
    s = ThinkSplitter()
    out = [s.feed(p) for p in ["<thi", "nk>let me", " see</th", "ink>42", "!"]]
    thinking = "".join(t for t, _ in out) + s.flush()[0]
    content = "".join(c for _, c in out)
    assert thinking == "let me see" and content == "42!"


def test_capabilities_are_read_from_templates() -> None:
    assert supports_tools("{{ range .Tools }}{{ end }}") and not supports_tools("{{ .Prompt }}")
    assert supports_thinking("{{ if .Thinking }}x{{ end }}") and not supports_thinking(
        "{{ .Prompt }}"
    )


def test_tool_call_streamer_sends_prose_at_once_and_holds_what_could_be_a_call() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]

    def run(pieces: list[str]) -> tuple[list[str], str, list]:
        st = ToolCallStreamer(tools)
        sent = [st.feed(p) for p in pieces]
        rest, calls = st.finish()
        return sent, rest, calls

    # Prose streams as it comes (trailing space held a moment in case a call follows it).
    sent, rest, calls = run(["It is ", "sunny ", "today."])
    assert sent == ["It is", " sunny", " today."] and rest == "" and calls == []
    # A call, its marker cut between pieces, is never sent as text and comes back parsed.
    sent, rest, calls = run(
        ["Let me check. <tool", '_call>{"name": "f", ', '"arguments": {"x": 1}}</tool_call>']
    )
    assert "".join(sent) == "Let me check." and rest == ""
    assert calls == [{"function": {"name": "f", "arguments": {"x": 1}}}]
    # Held text that turns out not to be a call is not lost.
    sent, rest, calls = run(["a set {1, 2}", " here"])
    assert "".join(sent) + rest == "a set {1, 2} here" and calls == []


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "minItems": "x"},
        {"type": "string", "maxLength": [1]},
        {"anyOf": 5},
        {"required": 5, "properties": {"a": {}}},
        {"type": "array", "minItems": 3, "maxItems": 1},
    ],
)
def test_malformed_schemas_are_the_callers_mistake_not_a_crash(schema: dict) -> None:
    with pytest.raises(BadRequest, match="format: "):
        grammar_for_format(schema)
