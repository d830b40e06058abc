"""Go text/template as Ollama's Modelfile TEMPLATEs use it, checked on real library templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.models.gotemplate import TemplateError, parse, render

TEMPLATES = Path(__file__).parent / "templates"


def tmpl(name: str) -> str:
    # Ollama's library templates carry no trailing newline; the files here do, for editors.
    return (TEMPLATES / f"{name}.tmpl").read_text().removesuffix("\n")


def test_gemma3_template_renders_a_conversation_with_a_generation_prompt() -> None:
    msgs = [
        {"Role": "system", "Content": "Be brief."},
        {"Role": "user", "Content": "Hi"},
        {"Role": "assistant", "Content": "Hello!"},
        {"Role": "user", "Content": "How are you?"},
    ]
    out = render(tmpl("gemma3"), {"Messages": msgs})
    assert out == (
        "<start_of_turn>user\nBe brief.<end_of_turn>\n"
        "<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_llama3_prompt_template_skips_empty_system() -> None:
    out = render(tmpl("llama3"), {"System": "", "Prompt": "Hi", "Response": ""})
    assert out == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>"
    )
    with_system = render(tmpl("llama3"), {"System": "S", "Prompt": "P"})
    assert with_system.startswith("<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>")


def test_qwen_template_lists_tools_and_renders_tool_calls_as_json() -> None:
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"city": "str"}}}
    ]
    for t in tools:
        t["Function"] = t["function"]
    msgs = [
        {"Role": "user", "Content": "Weather in Paris?"},
        {
            "Role": "assistant",
            "Content": "",
            "ToolCalls": [{"Function": {"Name": "get_weather", "Arguments": {"city": "Paris"}}}],
        },
        {"Role": "tool", "Content": "sunny"},
    ]
    out = render(tmpl("qwen25"), {"Messages": msgs, "Tools": tools, "System": "Sys"})
    assert out.startswith("<|im_start|>system\nSys\n\n# Tools\n")
    assert (
        '{"type": "function", "function": {"name":"get_weather","parameters":{"city":"str"}}}'
        in out
    )
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>' in out
    )
    assert out.endswith(
        "<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen_template_without_messages_uses_prompt_branch() -> None:
    out = render(tmpl("qwen25"), {"Prompt": "Hi", "Response": "Yo"})
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>"


def test_mistral_template_puts_system_and_tools_before_last_user_turn() -> None:
    msgs = [
        {"Role": "user", "Content": "a"},
        {"Role": "assistant", "Content": "b"},
        {"Role": "user", "Content": "c"},
    ]
    tools = [{"type": "function", "function": {"name": "f"}}]
    out = render(tmpl("mistral"), {"Messages": msgs, "System": "S", "Tools": tools})
    assert out == (
        '[INST] a[/INST] b</s>[AVAILABLE_TOOLS] [{"type":"function","function":{"name":"f"}}]'
        "[/AVAILABLE_TOOLS][INST] S\n\nc[/INST] "
    )


def test_trim_markers_remove_whitespace_on_their_side_only() -> None:
    assert render("a  {{- 1 -}}  b") == "a1b"
    assert render("a  {{ 1 -}}  b") == "a  1b"
    assert render("a\n\n{{- /* note */ -}}\n b") == "ab"
    assert render("{{-3}}") == "-3"


def test_variables_scope_to_their_block_and_assignment_updates_outer() -> None:
    src = '{{ $x := "out" }}{{ if true }}{{ $x := "in" }}{{ $x }}{{ end }}{{ $x }}'
    assert render(src) == "inout"
    assert render("{{ $x := 1 }}{{ range .L }}{{ $x = . }}{{ end }}{{ $x }}", {"L": [4, 5]}) == "5"


def test_range_else_break_continue_and_maps_in_key_order() -> None:
    src = "{{ range .L }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ if eq . 4 }}{{ break }}{{ end }}{{ . }}{{ else }}none{{ end }}"
    assert render(src, {"L": [1, 2, 3, 4, 5]}) == "13"
    assert render(src, {"L": []}) == "none"
    assert (
        render("{{ range $k, $v := .M }}{{ $k }}={{ $v }};{{ end }}", {"M": {"b": 2, "a": 1}})
        == "a=1;b=2;"
    )


def test_with_else_and_else_with_chain() -> None:
    src = "{{ with .A }}A={{ . }}{{ else with .B }}B={{ . }}{{ else }}none{{ end }}"
    assert render(src, {"A": "x"}) == "A=x"
    assert render(src, {"B": "y"}) == "B=y"
    assert render(src, {}) == "none"


def test_functions_and_pipelines() -> None:
    data = {"S": "a<b", "L": [1, 2, 3], "M": {"k": "v"}}
    assert render('{{ .S | printf "%q" }}', data) == '"a\\u003cb"'
    assert render('{{ printf "%s-%d-%05.2f" "x" 7 3.14159 }}') == "x-7-03.14"
    assert render('{{ index .M "k" }}{{ index .L 1 }}{{ len .L }}', data) == "v23"
    assert render("{{ slice .L 1 }}", data) == "[2 3]"
    assert (
        render('{{ json .M }}|{{ html .S }}|{{ print 1 2 "x" }}', data) == '{"k":"v"}|a&lt;b|1 2x'
    )
    assert (
        render('{{ and 1 0 }}{{ or 0 "" "z" }}{{ not 0 }}{{ eq 1 2 3 1 }}{{ lt 1 2 }}')
        == "0ztruetruetrue"
    )
    assert render("{{ (index .L 0) }}{{ $.M.k }}{{ (.M).k }}", data) == "1vv"


def test_and_short_circuits_so_later_operands_are_not_evaluated() -> None:
    assert render("{{ if and .Missing (index .Missing 5) }}x{{ else }}y{{ end }}", {}) == "y"


@pytest.mark.parametrize(
    ("source", "line", "needle"),
    [
        ("ok\n{{ if .X }}\nno end", 2, "no {{end}}"),
        ("a\nb\n{{ end }}", 3, "unexpected {{end}}"),
        ("{{ nosuchfunc 1 }}", 1, 'function "nosuchfunc" not defined'),
        ("x\n{{ .A", 2, "unclosed action"),
        ("{{ else }}", 1, "unexpected {{else}}"),
        ('{{ template "x" }}', 1, "not supported"),
        ("{{ break }}", 1, "outside"),
        ("{{ (1 }}", 1, "unclosed"),
        ("{{ }}", 1, "missing value"),
    ],
)
def test_syntax_errors_carry_their_line(source: str, line: int, needle: str) -> None:
    with pytest.raises(TemplateError) as info:
        parse(source)
    assert info.value.line == line
    assert needle in str(info.value)


def test_undefined_variable_and_bad_function_call_fail_at_render() -> None:
    with pytest.raises(TemplateError, match=r"undefined variable \$y"):
        render("{{ $y }}")
    with pytest.raises(TemplateError, match="error calling index"):
        render("{{ index .L 9 }}", {"L": [1]})
    with pytest.raises(TemplateError, match="non-function"):
        render("{{ 1 | 2 }}")
