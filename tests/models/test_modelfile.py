"""Modelfile parsing: every instruction, Ollama's parameter types, errors with their lines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.models.modelfile import Message, Modelfile, ModelfileError, parse_modelfile

FULL = '''# a comment
from gemma3:270m
ADAPTER ./lora.gguf
template """{{ if .System }}{{ .System }}
{{ end }}{{ .Prompt }}"""
SYSTEM "You are a \\"pirate\\"."
PARAMETER temperature 0.7
PARAMETER num_ctx 4096
PARAMETER stop <end_of_turn>
PARAMETER stop "[INST]"
PARAMETER use_mmap false
PARAMETER Top_K 40
LICENSE """MIT
text"""
LICENSE Apache-2.0
MESSAGE user Is this a question?
message Assistant "Yes, it is."
'''


def test_every_instruction_is_read_with_ollama_types() -> None:
    mf = parse_modelfile(FULL)
    assert mf.from_ == "gemma3:270m"
    assert mf.adapters == ["./lora.gguf"]
    assert mf.template == "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}"
    assert mf.system == 'You are a "pirate".'
    assert mf.parameters == {
        "temperature": 0.7,
        "num_ctx": 4096,
        "stop": ["<end_of_turn>", "[INST]"],
        "use_mmap": False,
        "top_k": 40,
    }
    assert isinstance(mf.parameters["num_ctx"], int)
    assert mf.licenses == ["MIT\ntext", "Apache-2.0"]
    assert mf.messages == [
        Message("user", "Is this a question?"),
        Message("assistant", "Yes, it is."),
    ]


def test_render_parses_back_to_an_equal_modelfile() -> None:
    mf = parse_modelfile(FULL)
    assert parse_modelfile(mf.render()) == mf


_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"\\')
    | st.sampled_from(["\n", '"', "\\", " "]),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(system=_text, template=_text, msg=_text.filter(lambda s: "\n" not in s or '"""' not in s))
def test_render_round_trips_arbitrary_text(system: str, template: str, msg: str) -> None:
    mf = Modelfile(from_="x", system=system, template=template, messages=[Message("user", msg)])
    try:
        text = mf.render()
    except ModelfileError:
        # Only a value with both a newline and a triple quote is unwritable.
        assert any('"""' in v or v.endswith('"') for v in (system, template, msg))
        return
    assert parse_modelfile(text) == mf


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("FROM x\nFORM y\n", 2, 'unknown instruction "FORM", expected one of FROM'),
        ("# only a comment\n", None, "no FROM instruction"),
        ("FROM a\n\nFROM b\n", 3, "FROM given twice (first at line 1)"),
        ("FROM\n", 1, "FROM needs a value"),
        ("FROM x\nPARAMETER num_ctx lots\n", 2, "PARAMETER num_ctx expects an integer"),
        ("FROM x\nPARAMETER temperature hot\n", 2, "expects a finite number"),
        ("FROM x\nPARAMETER use_mmap maybe\n", 2, "expects true or false"),
        ("FROM x\nPARAMETER warp_speed 9\n", 2, 'unknown parameter "warp_speed"'),
        ("FROM x\nPARAMETER\n", 2, "PARAMETER needs a name and a value"),
        ("FROM x\nPARAMETER top_k\n", 2, "PARAMETER needs a value"),
        (
            "FROM x\nMESSAGE robot hi\n",
            2,
            'MESSAGE role "robot" is not one of system, user, assistant',
        ),
        ('FROM x\n\nTEMPLATE """abc\nmore\n', 3, 'unterminated """'),
        ('FROM x\nSYSTEM "abc\n', 2, "unterminated quoted value"),
        ('FROM x\nSYSTEM "a" b\n', 2, "unexpected text after closing quote"),
        ('FROM x\nSYSTEM """a\nb""" c\n', 3, 'unexpected text after closing """'),
    ],
)
def test_errors_name_the_line_and_what_was_expected(
    text: str, line: int | None, needle: str
) -> None:
    with pytest.raises(ModelfileError) as info:
        parse_modelfile(text)
    assert info.value.line == line
    assert needle in str(info.value)
    if line:
        assert str(info.value).startswith(f"Modelfile line {line}: ")


def test_crlf_and_indentation_are_tolerated() -> None:
    mf = parse_modelfile("  FROM  model:tag  \r\n\tSYSTEM  hello there \r\n")
    assert mf.from_ == "model:tag"
    assert mf.system == "hello there"
